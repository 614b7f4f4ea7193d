"""Train one stage of the SemHiTok tokenizer (DESIGN §3); a run in an existing out_dir resumes it.

    python scripts/train_tokenizer.py --config configs/tokenizer/tiny.yaml [key.path=value ...]
    torchrun --nproc_per_node 2 scripts/train_tokenizer.py --config configs/tokenizer/tiny.yaml

Stages chain through exports: stage 1 -> out_dir/model -> `train.init_from` of stage 2 -> ... -> stage 2b.
Bad configs, missing data (or none usable), a missing / mismatched `init_from`, every checkpoint damaged, an out_dir in
use by another run or a failed checkpoint write print one line and exit 2.
"""

import os
import sys

from semhitok.runtime import CheckpointError, ConfigError, Parser
from semhitok.train import load_run_config, train


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run config YAML (configs/tokenizer/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")
    args = p.parse_args(argv)
    try:
        model_dir = train(load_run_config(args.config, args.overrides))
    except (ConfigError, CheckpointError) as err:  # CheckpointError: also a busy out_dir, a full disk
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails the same way: say it once
            print(f"{p.prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("RANK", "0") == "0":
        print(f"exported {model_dir}")


if __name__ == "__main__":
    main()
