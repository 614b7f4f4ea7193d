"""Semantic probe of a SemHiTok checkpoint: kNN and linear-probe accuracy of teacher features vs semantic codes.

    python eval/semantic_probe.py --checkpoint DIR --data FOLDER [--classes N --per-class M --out DIR]

FOLDER holds one sub-folder per class (e.g. ../shared/data/real/caltech101-256). N classes spread evenly over the
sorted class names, the first M images of each (sorted). Writes OUT/probe.json and prints a table.
"""

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from semhitok.model import SemHiTok
from semhitok.probe import REPRESENTATIONS, semantic_probe
from semhitok.runtime import ImageFolderDataset, Parser, collate_skip_bad, positive_int


def class_subset(dataset: ImageFolderDataset, classes: int | None, per_class: int | None) -> list[int]:
    """Indices of the first `per_class` items of `classes` classes spread evenly over the sorted class list."""
    n = len(dataset.classes)
    if n < 2:
        raise ValueError(f"found {n} class sub-folder(s) of images; the probe needs at least 2")
    chosen = range(n) if classes is None or classes >= n else torch.linspace(0, n - 1, classes).round().long().tolist()
    by_class = {c: [i for i, t in enumerate(dataset.targets) if t == c] for c in chosen}
    return [i for c in chosen for i in by_class[c][:per_class]]


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="SemHiTok.save_pretrained folder")
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--classes", type=positive_int, default=None, help="number of classes (default: all)")
    p.add_argument("--per-class", type=positive_int, default=None, help="images per class (default: all)")
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--out", type=Path, default=Path("outputs/semantic_probe"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        model = SemHiTok.from_pretrained(args.checkpoint).to(args.device)
    except (OSError, ValueError) as err:
        p.error(f"--checkpoint {args.checkpoint} is not a usable SemHiTok checkpoint: {err}")
    try:
        model.teacher  # noqa: B018 (build it now: missing teacher weights fail here, not mid-run)
        dataset = ImageFolderDataset(args.data, model.config.image_size)
        subset = Subset(dataset, class_subset(dataset, args.classes, args.per_class))
        loader = DataLoader(subset, args.batch_size, collate_fn=collate_skip_bad)
        results = semantic_probe(model, loader, test_fraction=args.test_fraction, seed=args.seed)
    except (OSError, ValueError) as err:
        p.error(f"--data {args.data}: {err}")
    results = {**results, "checkpoint": str(args.checkpoint.resolve()), "data": str(args.data.resolve())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(results, indent=2))
    print(f"{results['num_images']} images, {results['num_classes']} classes, {results['num_test']} test, "
          f"chance {results['chance']:.3f}")
    metrics = list(results[REPRESENTATIONS[0]])
    print(f"{'':<16}" + "".join(f"{m:>10}" for m in metrics))
    for r in REPRESENTATIONS:
        print(f"{r:<16}" + "".join(f"{results[r][m]:>10.3f}" for m in metrics))
    print(f"wrote {args.out / 'probe.json'}")


if __name__ == "__main__":
    main()
