"""Generate images from text with a SemHiTok MLLM (DESIGN §4 "Sampling": KV cache, classifier-free guidance).

    python scripts/generate.py --prompt "a red circle" [--prompt "two blue squares" ...] [--checkpoint DIR]
        [--num-images N] [--cfg S] [--cfg-schedule constant|linear] [--temperature T] [--top-k K] [--top-p P]
        [--seed X] [--out FILE.png] [--max-batch B] [--memory-budget GIB] [--trust-remote-code]

Writes a grid PNG at --out (one row per prompt, --num-images per row) and each image beside it as
<stem>-<prompt>-<image>.png, and prints their paths. All images are decoded together, in as few calls as the memory
budget allows; image n of prompt p uses seed X + p*N + n whatever the batch, so any single image can be re-made
alone. Bad input (empty or over-long prompt, an --out that is not a .png/.jpg path, missing or non-MLLM checkpoint)
prints one line on stderr and exits with status 2; --out is checked before anything loads. Code shipped with a
checkpoint runs only with --trust-remote-code.
"""

from functools import partial
from pathlib import Path

from tqdm import tqdm

from mllm.cli import (
    add_batching_args,
    add_sampling_args,
    image_path,
    load,
    one_line_errors,
    sampling_config,
    save_images,
)
from mllm.sampling import generate_images
from semhitok.runtime import Parser, positive_int


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for several")
    p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--cfg-schedule", choices=("constant", "linear"), default="constant")
    p.add_argument("--out", type=image_path, default=Path("outputs/generated.png"),
                   help="grid image (.png/.jpg); each image goes beside it as a PNG")  # fmt: skip
    add_batching_args(p)
    add_sampling_args(p, temperature=1.0)
    args = p.parse_args(argv)
    with one_line_errors(p.prog):
        cfg = sampling_config(args, cfg_scale=args.cfg, cfg_schedule=args.cfg_schedule, num_images=args.num_images)
        run = load(args)
        progress = partial(tqdm, desc="image tokens", unit="tok", leave=False)
        grid = generate_images(run.model, args.prompt, cfg, tokenizer=run.tokenizer, template=args.template,
                               progress=progress)  # fmt: skip
        paths = save_images(run.decode(grid), args.out, args.num_images)
    print(f"grid: {paths[0]}")
    print("images:", *paths[1:], sep="\n  ")


if __name__ == "__main__":
    main()
