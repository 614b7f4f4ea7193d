"""GenEval: generate images for GenEval prompts in its folder layout, score them, or write synthetic prompts.

    python eval/geneval.py generate --metadata evaluation_metadata.jsonl --out DIR [--checkpoint DIR --num-images 4
                                    --cfg 3 --seed 0 --limit N --max-batch B --memory-budget GIB]
    python eval/geneval.py score --images DIR [--out results.json]
    python eval/geneval.py synthetic-metadata --num 60 --seed 1 --out FILE

`generate` decodes as many prompts per call as one call's memory budget holds (default: half the device's free
memory; `--max-batch` caps the images per call) and writes each call's folders when it returns; the images do not
depend on the batch. `score` uses the synthetic domain's exact detector: synthetic-domain prompts (from
`synthetic-metadata`) are scored, others (the official 553) are counted as not scorable. Score those with GenEval's own evaluator on the same folder:
`python evaluation/evaluate_images.py DIR --outfile results.jsonl --model-path WEIGHTS` (djghosh13/geneval).
Overall = mean of the per-tag accuracies, as GenEval's summary_scores.py computes it.
"""

import argparse
import json
from pathlib import Path

from mllm.cli import add_batching_args, add_sampling_args, load, one_line_errors, sampling_config
from mllm.evaluation.geneval import (
    expand_entries,
    format_summary,
    generate,
    load_metadata,
    score_folder,
    synthetic_metadata,
    write_metadata,
)
from semhitok.runtime import Parser, positive_int


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="images for each prompt, in GenEval's folder layout (resumable)")
    g.add_argument("--metadata", type=Path, required=True, help="GenEval evaluation_metadata.jsonl")
    g.add_argument("--out", type=Path, required=True, help="image folder (<index:05d>/samples/<k:04d>.png)")
    g.add_argument("--num-images", type=positive_int, default=4, help="images per prompt")
    g.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    g.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts")
    g.add_argument("--expand", action="store_true",
                   help="prompt expansion: the model first writes a detailed scene description of each prompt "
                        "(greedy, text only) and draws from that; the folder's metadata keeps it as `prompt`, the "
                        "original as `original_prompt`")  # fmt: skip
    add_batching_args(g)
    add_sampling_args(g, temperature=1.0)
    s = sub.add_parser("score", help="score an image folder with the synthetic detector")
    s.add_argument("--images", type=Path, required=True, help="folder written by `generate`")
    s.add_argument("--out", type=Path, default=None, help="results JSON (default: <images>/results.json)")
    m = sub.add_parser("synthetic-metadata", help="synthetic-domain prompts in GenEval's metadata schema")
    m.add_argument("--num", type=positive_int, default=60)
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--out", type=Path, required=True)
    return p


def run_generate(args: argparse.Namespace) -> None:
    entries = load_metadata(args.metadata)[: args.limit]
    cfg = sampling_config(args, cfg_scale=args.cfg, num_images=args.num_images)
    run = load(args)
    done = generate(run, expand_entries(run, entries) if args.expand else entries, args.out, args.num_images, cfg)
    print(f"generated {len(done)} prompts ({len(entries) - len(done)} already complete) into {args.out}")


def run_score(args: argparse.Namespace) -> None:
    scored = score_folder(args.images)
    out = args.out or args.images / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(scored, indent=1) + "\n")
    print(format_summary(scored["summary"]))
    print(f"results: {out}")


def run_synthetic_metadata(args: argparse.Namespace) -> None:
    write_metadata(args.out, synthetic_metadata(args.num, args.seed))
    print(f"{args.num} synthetic GenEval prompts: {args.out}")


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    run = {"generate": run_generate, "score": run_score, "synthetic-metadata": run_synthetic_metadata}[args.command]
    with one_line_errors(f"{p.prog} {args.command}"):
        run(args)


if __name__ == "__main__":
    main()
