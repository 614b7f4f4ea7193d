"""Evaluate a SemHiTok MLLM with lmms-eval's own task code (the model is lmms-eval's `semhitok`, an entry point).

    python eval/run_lmms.py --tasks mme,pope --model-path DIR [--limit N --batch-size B --output DIR
                            --include-path DIR --device auto --template auto --seed 0 --gen-kwargs max_new_tokens=8
                            --trust-remote-code]

Tasks: any lmms-eval image task whose dataset is in the Hugging Face cache (mme, pope, ...; nothing is downloaded:
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE default to 1), and the local tasks built by eval/build_lmms_tasks.py
(coco_pope_mini, synthetic_pope, synthetic_mme, ...) found under --include-path (default outputs/lmms_tasks).
Writes lmms-eval's results JSON (scores, every task config with its generation_kwargs, model_args, batch size,
limit, seeds) and one samples file per task to --output/<model>/, and prints a table of the scores.
Code shipped with the checkpoint runs only with --trust-remote-code (model_args trust_remote_code=True).
"""

import difflib
import os
import sys
from pathlib import Path

from semhitok.runtime import Parser, fail, positive_int

DEFAULT_TASKS = Path("outputs/lmms_tasks")


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval task or group names")
    p.add_argument("--model-path", type=Path, help="MLLM folder (SemHiTokLM.save_pretrained); default: the demo model")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N documents of each task")
    p.add_argument("--batch-size", type=positive_int, default=1, help="questions decoded together")
    p.add_argument("--output", type=Path, default=Path("outputs/lmms_eval"), help="results folder")
    p.add_argument("--include-path", type=Path, action="append", help=f"folder of task YAMLs, repeatable "
                   f"(default: {DEFAULT_TASKS} when it exists)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--template", default="auto", help="conversation template the model was trained with")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (greedy tasks do not use it)")
    p.add_argument("--gen-kwargs", default=None, help="override every task's generation_kwargs, e.g. max_new_tokens=8")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto = bf16 weights where "
                   "the device computes bf16 natively, else fp32")  # fmt: skip
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run Python code shipped with "
                   "the checkpoint's LLM; only for checkpoints whose source you trust")  # fmt: skip
    return p


def model_args(args) -> str:
    """lmms-eval's model_args string of the semhitok model for these flags."""
    from mllm.cli import checkpoint_dir

    text = f"pretrained={checkpoint_dir(args.model_path)},device={args.device},template={args.template}"
    text += f",seed={args.seed},precision={args.precision}"
    return text + (",trust_remote_code=True" if args.trust_remote_code else "")


def resolve_tasks(manager, text: str) -> list[str]:
    """Comma-separated names -> list; ValueError naming each unknown one with its closest known names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = manager.all_tasks
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        hints = [f"{n!r} (close: {', '.join(difflib.get_close_matches(n, known, n=5, cutoff=0.5)) or 'none'})"
                 for n in unknown]  # fmt: skip
        raise ValueError(f"unknown task {'; '.join(hints) or '(none given)'}; build local tasks with "
                         "eval/build_lmms_tasks.py and pass their folder with --include-path")  # fmt: skip
    return names


def score_table(results: dict) -> str:
    """task, metric, value: one line per score in lmms-eval's results (stderr and aliases left out)."""
    rows = [(task, metric.split(",")[0], value) for task, scores in results["results"].items()
            for metric, value in scores.items() if metric != "alias" and "_stderr" not in metric
            and isinstance(value, int | float)]  # fmt: skip
    width = max([len(t) for t, _, _ in rows] + [4])
    lines = [f"{'task':<{width}}  {'metric':<22}  value"] + [f"{t:<{width}}  {m:<22}  {v:.4f}" for t, m, v in rows]
    return "\n".join(lines)


def evaluate(args) -> None:
    """Run lmms-eval on the tasks, save its results JSON and samples files, print the scores."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import get_datetime_str
    from loguru import logger
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logger.remove()  # lmms-eval logs to stdout; stdout is for the score table here
    logger.add(sys.stderr, level="WARNING", format="{time:HH:mm:ss} | {level} | {name} - {message}")
    includes = args.include_path or ([str(DEFAULT_TASKS)] if DEFAULT_TASKS.is_dir() else None)
    paths = [str(p) for p in includes] if includes else None
    manager = TaskManager("WARNING", include_path=paths, model_name="semhitok")  # selects tasks' `semhitok` prompts
    tasks = resolve_tasks(manager, args.tasks)
    tracker, stamp = EvaluationTracker(output_path=str(args.output)), get_datetime_str()
    results = simple_evaluate(model="semhitok", model_args=model_args(args), tasks=tasks, batch_size=args.batch_size,
                              limit=args.limit, gen_kwargs=args.gen_kwargs, log_samples=True, task_manager=manager,
                              evaluation_tracker=tracker, verbosity="WARNING", datetime_str=stamp)  # fmt: skip
    samples = results.pop("samples")
    results["config"]["run_lmms"] = {"argv": sys.argv[1:], "include_path": includes}
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=stamp)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    print(score_table(results))
    print(f"results and samples: {Path(args.output) / tracker.general_config_tracker.model_name_sanitized}/{stamp}_*")


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    # Only local data and the Hugging Face cache, never the network. Set before any Hugging Face library is imported
    # (they read these at import time), so the imports below are inside functions.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from tenacity import RetryError

    from mllm.cli import one_line_errors

    with one_line_errors(p.prog):
        try:
            evaluate(args)
        except NotImplementedError as err:  # e.g. a loglikelihood task
            fail(p.prog, str(err))
        except RetryError as err:  # lmms-eval retries loading a task's dataset, then raises this
            cause = err.last_attempt.exception()
            fail(p.prog, f"a task's dataset could not be loaded ({' '.join(str(cause).split())}); with "
                 f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']} only datasets already in the Hugging Face cache "
                 "load: download it once with network access, or use the local tasks of eval/build_lmms_tasks.py")  # fmt: skip


if __name__ == "__main__":
    main()
