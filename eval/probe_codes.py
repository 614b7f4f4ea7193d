"""Code probes of a SemHiTok checkpoint: what the teacher, the student, the semantic codes, the texture codes and both
carry, side by side (count, colour, shape, position, POPE-style "is there a <colour> <shape>").

    python eval/probe_codes.py --checkpoint DIR [--scenes 2000 --seed 7]          # synthetic domain (held-out seed)
    python eval/probe_codes.py --checkpoint DIR --data FOLDER [--per-class 40]     # image folder, one sub-folder a class
    ... --gate student.shape=0.85 --gate semantic_codes.shape=0.80                 # exit 1 unless reached

Each representation gets the same probe (a per-patch MLP, mean- and max-pooled; semhitok.attribute_probe), trained on
the first `--train-fraction` of the images and scored on the rest. Writes OUT/probe_codes.json and prints a table of
accuracies (rows: representations and the majority-answer chance; columns: tasks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from mllm.synthetic.dataset import sample_dataset_scenes
from mllm.synthetic.probe_targets import probe_targets
from mllm.synthetic.render import render
from semhitok.attribute_probe import batched_code_representations, format_table, probe_table
from semhitok.model import SemHiTok
from semhitok.runtime import (
    ImageFolderDataset,
    Parser,
    check_gates,
    collate_skip_bad,
    fail,
    gate,
    int_in,
    positive_int,
    resolve_device,
    to_tensor,
)


def synthetic_set(model: SemHiTok, n: int, seed: int, batch_size: int):
    """n held-out scenes rendered at the tokenizer's size -> (representations, targets)."""
    scenes, _, _ = sample_dataset_scenes(n, np.random.default_rng(seed))
    size = model.config.image_size
    images = torch.stack([to_tensor(render(scene, size)) for scene in scenes])
    return batched_code_representations(model, images, batch_size=batch_size), probe_targets(scenes)


def folder_set(model: SemHiTok, folder: Path, per_class: int | None, batch_size: int):
    """An image folder (one sub-folder per class) -> (representations, {"class": labels}), in a seeded shuffled order."""
    dataset = ImageFolderDataset(folder, model.config.image_size)
    if len(dataset.classes) < 2:
        raise ValueError(f"{folder}: found {len(dataset.classes)} class sub-folder(s); the probe needs at least 2")
    keep = [i for c in range(len(dataset.classes)) for i in [j for j, t in enumerate(dataset.targets) if t == c][:per_class]]
    order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(0)).tolist()
    images, labels = [], []
    for batch in DataLoader(Subset(dataset, [keep[i] for i in order]), batch_size, collate_fn=collate_skip_bad):
        images += list(batch["image"])
        labels += batch["label"].tolist()
    return batched_code_representations(model, torch.stack(images), batch_size=batch_size), {"class": torch.tensor(labels)}


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="SemHiTok.save_pretrained folder")
    p.add_argument("--data", type=Path, help="image folder with one sub-folder per class (default: synthetic scenes)")
    p.add_argument("--scenes", type=int_in(20), default=2000, help="synthetic scenes (train + test)")
    p.add_argument("--seed", type=int, default=7, help="synthetic scenes' seed (training data used 0)")
    p.add_argument("--per-class", type=positive_int, default=None, help="--data: images per class (default: all)")
    p.add_argument("--train-fraction", type=float, default=0.8)
    p.add_argument("--epochs", type=positive_int, default=30, help="probe training epochs")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--out", type=Path, default=Path("outputs/probe_codes"))
    p.add_argument("--device", default="auto")
    p.add_argument("--gate", type=gate, action="append", default=[], metavar="REP.TASK=MIN",
                   help="fail (exit 1) unless this accuracy reaches MIN, e.g. student.shape=0.85; repeatable")
    args = p.parse_args(argv)
    if not 0.0 < args.train_fraction < 1.0:
        p.error(f"--train-fraction must be in (0, 1), got {args.train_fraction}")
    try:
        device = resolve_device(args.device, option="--device")
        model = SemHiTok.from_pretrained(args.checkpoint).to(device)
        model.teacher  # noqa: B018 (build it now: missing teacher weights fail here, not mid-run)
        if args.data is not None:
            reps, targets = folder_set(model, args.data, args.per_class, args.batch_size)
        else:
            reps, targets = synthetic_set(model, args.scenes, args.seed, args.batch_size)
    except (OSError, ValueError) as err:
        fail(p.prog, " ".join(str(err).split()))
    n = len(next(iter(targets.values())))
    cut = int(round(n * args.train_fraction))
    if not 0 < cut < n:
        p.error(f"{n} images cannot be split {args.train_fraction:.2f} / {1 - args.train_fraction:.2f}")
    train, test = torch.arange(cut), torch.arange(cut, n)
    table = probe_table(reps, targets, train, test, epochs=args.epochs)
    results = {"checkpoint": str(args.checkpoint.resolve()), "data": str(args.data) if args.data else "synthetic",
               "images": n, "train": cut, "test": n - cut, "epochs": args.epochs, "accuracy": table}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_codes.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{n} images ({cut} train / {n - cut} test); probe accuracy per task:")
    print(format_table(table))
    print(f"wrote {args.out / 'probe_codes.json'}")
    check_gates(p.prog, table, args.gate)


if __name__ == "__main__":
    main()
