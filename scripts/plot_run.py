"""Learning curves of a training run (tokenizer or MLLM): RUN/log.jsonl -> RUN/curves.png; or of the stages of a
staged recipe, one after another on one step axis.

    python scripts/plot_run.py RUN [--out PNG] [--title TEXT] [--groups diag train]
    python scripts/plot_run.py runs/demo/mllm-align runs/demo/mllm-instruct runs/demo/mllm-t2i --groups diag \\
        --out docs/img/demo-stages.png
"""

from pathlib import Path

from semhitok.runtime import Parser, fail
from semhitok.runtime.plots import plot_curves


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                   help="run folders (train.out_dir / out_dir) holding log.jsonl; several: the stages, in order")  # fmt: skip
    p.add_argument("--out", type=Path, help="PNG path (default: the last RUN/curves.png)")
    p.add_argument("--title", default="")
    p.add_argument("--groups", nargs="+", default=(), metavar="GROUP",
                   help="only these metric groups (the key prefix before '/': train, diag, holdout, ...)")  # fmt: skip
    args = p.parse_args(argv)
    logs = [run / "log.jsonl" for run in args.runs]
    for log in logs:
        if not log.is_file():
            fail(p.prog, f"{log} not found: pass a run folder written by scripts/train_tokenizer.py or train_mllm.py")
    title = args.title or " -> ".join(run.name for run in args.runs)
    try:
        out = plot_curves(logs, args.out or args.runs[-1] / "curves.png", title, args.groups)
    except (OSError, ValueError) as err:
        fail(p.prog, str(err))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
