"""Learning curves of a training run (tokenizer or MLLM): RUN/log.jsonl -> RUN/curves.png.

    python scripts/plot_run.py RUN [--out PNG] [--title TEXT]
"""

from pathlib import Path

from semhitok.runtime import Parser, fail
from semhitok.runtime.plots import plot_curves


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run folder (train.out_dir / out_dir) holding log.jsonl")
    p.add_argument("--out", type=Path, help="PNG path (default: RUN/curves.png)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    log = args.run / "log.jsonl"
    if not log.is_file():
        fail(p.prog, f"{log} not found: pass a run folder written by scripts/train_tokenizer.py or train_mllm.py")
    try:
        out = plot_curves(log, args.out or args.run / "curves.png", args.title or args.run.name)
    except (OSError, ValueError) as err:
        fail(p.prog, str(err))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
