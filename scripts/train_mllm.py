"""Train one stage of the SemHiTok MLLM (DESIGN §4); a run whose out_dir holds a complete checkpoint resumes it.

    python scripts/train_mllm.py --config configs/mllm/tiny.yaml [key.path=value ...]              one process
    torchrun --nproc_per_node 2 scripts/train_mllm.py --config configs/mllm/smollm2-joint.yaml     DDP
    deepspeed --num_gpus 8 scripts/train_mllm.py --config configs/mllm/vicuna7b-instruct.yaml \\
        --deepspeed configs/deepspeed/zero3.json                                                  DeepSpeed ZeRO

    python scripts/train_mllm.py --config C.yaml --export-step 200 [--export-to DIR]
        a checkpoint of the run (step 200) as a model folder (default out_dir/model-step-000200), to evaluate a
        stage before it ends; nothing trains

Stages chain through folders: pretrain's out_dir/model -> `train.init_from` of instruct, and so on.
Bad configs, missing files or data, tokenizer / vocabulary mismatches, data without a usable sample, an out_dir in use
by another run and a failed checkpoint write print one line and exit with status 2.
"""

import argparse
import os
import sys
from pathlib import Path

from mllm.train import export_checkpoint, load_run_config, train
from semhitok.runtime import CheckpointError, ConfigError, Parser


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run config YAML (configs/mllm/*.yaml)")
    p.add_argument("--deepspeed", help="ZeRO policy JSON (configs/deepspeed/zero2.json, zero3.json) = train.deepspeed")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's; LOCAL_RANK is read
    p.add_argument("--export-step", type=int, metavar="N", help="write checkpoint step N as a model folder, then exit")
    p.add_argument("--export-to", type=Path, metavar="DIR", help="where --export-step writes (default out_dir/model-step-N)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    overrides = [*args.overrides, *([f"train.deepspeed={args.deepspeed}"] if args.deepspeed else [])]
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        run = load_run_config(args.config, overrides)
        model_dir = train(run) if args.export_step is None else export_checkpoint(run, args.export_step, args.export_to)
    except (ConfigError, CheckpointError) as err:  # CheckpointError: also a busy out_dir, a full disk
        if main_rank:  # every rank fails the same way: say it once
            print(f"{p.prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    if main_rank:
        print(f"saved {model_dir}")


if __name__ == "__main__":
    main()
