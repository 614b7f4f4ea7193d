"""Render a synthetic-domain dataset with its captions, GenEval metadata, POPE, MME and LLaVA files.

    python scripts/render_synthetic.py --out DIR --num N --size 256 --seed 0 [--conversations 1]

The folder layout is described in `mllm/synthetic/dataset.py`.
"""

from pathlib import Path

from mllm.synthetic.dataset import write_dataset
from semhitok.runtime import Parser, int_in


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--num", type=int_in(1, 10_000_000), required=True, help="number of images")
    p.add_argument("--size", type=int_in(16, 4096), default=256, help="image side in pixels")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    p.add_argument("--conversations", type=int_in(1, 1000), default=1,
                   help="independent LLaVA conversations per image in llava.json (the first is the same whatever N)")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    write_dataset(args.out, args.num, args.size, args.seed, args.conversations)
    print(f"wrote {args.num} images ({args.size}px) and their annotations to {args.out}")


if __name__ == "__main__":
    main()
