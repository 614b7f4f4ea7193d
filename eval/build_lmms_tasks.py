"""Build local lmms-eval tasks (lmms-eval's own pope / mme task code on local data) for eval/run_lmms.py.

    python eval/build_lmms_tasks.py coco-pope --coco ../shared/data/real/coco-491 [--out outputs/lmms_tasks]
        tasks coco_pope_mini_{random,popular,adversarial}, group coco_pope_mini: POPE's recipe on real COCO images
    python eval/build_lmms_tasks.py synthetic [--num 100 --size 64 --seed 1000 | --data DIR] [--out outputs/lmms_tasks]
        tasks synthetic_pope_{random,popular,adversarial} (group synthetic_pope) and synthetic_mme, from scenes
        rendered here (use a seed the model was not trained on) or from a scripts/render_synthetic.py folder
--name changes the task-name prefix. Each set goes into OUT/<name>/ (parquet + task YAMLs); pass OUT to
`eval/run_lmms.py --include-path` (its default is outputs/lmms_tasks).
"""

import argparse
import tempfile
from pathlib import Path

from mllm.evaluation.lmms_tasks import (
    build_pope_tasks,
    coco_pope_records,
    synthetic_mme_records,
    synthetic_pope_records,
    write_task,
)
from mllm.synthetic.dataset import write_dataset
from semhitok.runtime import Parser, fail, int_in, positive_int

DEFAULT_OUT = Path("outputs/lmms_tasks")


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    c = sub.add_parser("coco-pope", help="POPE random / popular / adversarial on COCO images with object annotations")
    c.add_argument("--coco", type=Path, required=True, help="folder with annotations.jsonl ({image, objects})")
    c.add_argument("--min-objects", type=positive_int, default=3, help="images with at least this many categories")
    c.add_argument("--per-image", type=positive_int, default=3, help="yes questions (and as many no) per image")
    c.add_argument("--num-images", type=positive_int, default=None, help="at most this many images (default: all)")
    c.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    c.add_argument("--name", default="coco_pope_mini")
    s = sub.add_parser("synthetic", help="POPE and MME on synthetic scenes")
    s.add_argument("--data", type=Path, default=None, help="a scripts/render_synthetic.py folder (else render here)")
    s.add_argument("--num", type=int_in(1, 1_000_000), default=100, help="scenes to render")
    s.add_argument("--size", type=int_in(16, 4096), default=64, help="image side in pixels")
    s.add_argument("--seed", type=int_in(0, 2**63 - 1), default=1000)
    s.add_argument("--name", default="synthetic")
    for q in (c, s):
        q.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"tasks root (default {DEFAULT_OUT})")
    return p


def build_coco(args: argparse.Namespace) -> list[str]:
    if not (args.coco / "annotations.jsonl").is_file():
        raise FileNotFoundError(f"no annotations.jsonl in {args.coco}: pass a folder like ../shared/data/real/coco-491")

    def records(split: str) -> list[dict]:
        return coco_pope_records(args.coco, split, args.seed, args.min_objects, args.per_image, args.num_images)

    return build_pope_tasks(args.out / args.name, args.name, records, f"COCO {args.coco.resolve()}")


def build_synthetic(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_dataset(Path(tmp), args.num, args.size, args.seed)
        source = f"synthetic {args.data.resolve()}" if args.data else f"synthetic --num {args.num} --size {args.size} --seed {args.seed}"
        folder = args.out / args.name
        names = build_pope_tasks(folder, f"{args.name}_pope", lambda split: synthetic_pope_records(data, split), source)
        write_task(folder, f"{args.name}_mme", "mme", synthetic_mme_records(data), source)
    return [*names, f"{args.name}_mme"]


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        names = {"coco-pope": build_coco, "synthetic": build_synthetic}[args.command](args)
    except (OSError, ValueError, KeyError) as err:
        fail(f"{p.prog} {args.command}", " ".join(str(err).split()))
    print(f"tasks {', '.join(names)} in {args.out / args.name}; run: python eval/run_lmms.py --tasks {names[0]} "
          f"--include-path {args.out} --model-path DIR")  # fmt: skip


if __name__ == "__main__":
    main()
