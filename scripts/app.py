"""A local web demo of a SemHiTok MLLM: chat about an image, generate images, explore the tokenizer.

    python scripts/app.py [--checkpoint DIR] [--port 7860] [--host 127.0.0.1] [--precision auto] [--device auto]

Loads the checkpoint once (default: the shipped demo checkpoint) and serves a gradio page on host:port, offline (no
analytics, no share link, nothing fetched). Requests are queued; one model call runs at a time. A bad checkpoint or
flag prints one line on stderr and exits with status 2; bad uploads and settings are shown in the page.
Needs the `app` extra (in the lock: `make install` has it).
"""

from mllm.cli import add_sampling_args, load, one_line_errors
from semhitok.metrics import psnr
from semhitok.runtime import Parser, fail, positive_int


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=positive_int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    add_sampling_args(p, temperature=1.0)  # --seed, --top-k, --top-p are set in the page
    args = p.parse_args(argv)
    try:
        from mllm.app import ui  # gradio comes with the `app` extra
    except ModuleNotFoundError as err:
        fail(p.prog, f"{err.name} is not installed: run `make install` (the lock's `app` extra holds it)")
    with one_line_errors(p.prog):
        run = load(args)
        title = f"SemHiTok-MLLM: {'the shipped demo checkpoint' if args.checkpoint is None else args.checkpoint}"
        demo = ui.build(run, psnr, title, args.template, args.temperature)
        print(f"serving http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
        ui.launch(demo, args.host, args.port)


if __name__ == "__main__":
    main()
