"""Reconstruction metrics of a SemHiTok checkpoint over an image folder (DESIGN §3.3).

    python eval/reconstruction.py --checkpoint DIR --data FOLDER [--size 256 --batch-size 16 --limit N --out DIR]
    python eval/reconstruction.py --checkpoint RUN/model --holdout-of RUN   # a training run's held-out split
    python eval/reconstruction.py --checkpoint DIR --synthetic RENDER [--limit 500]  # + the exact detector's reading
    ... --gate detector.shape=0.9 --gate detector.count=0.95                          # exit 1 unless reached

`--synthetic` takes a folder written by `scripts/render_synthetic.py` (scenes.jsonl + images): besides the metrics it
reports what the synthetic domain's exact detector reads from the reconstructions (count, shape, colour, position
accuracy against the scenes), the tokenizer's reconstruction gate (docs/tokenizer.md), and GenEval's score of the
reconstructions of the scenes rendered for GenEval entries (`geneval_ceiling`: what generation through this tokenizer
can reach at most).
Writes OUT/results.json (metrics, image counts, checkpoint, protocol, networks) and OUT/reconstructions.png
(the first 8 originals over their reconstructions); prints a short table. The protocol is `semhitok.metrics.PROTOCOL`.
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from mllm.evaluation.geneval import judge_images
from mllm.synthetic import Scene
from mllm.synthetic.detector import reconstruct_and_detect
from semhitok.metrics import PROTOCOL, evaluate_reconstruction, fid_features_for
from semhitok.model import SemHiTok
from semhitok.objectives import image_grid
from semhitok.runtime import (
    AssetError,
    ConfigError,
    ImageFolderDataset,
    Parser,
    check_gates,
    collate_skip_bad,
    gate,
    load_image,
    positive_int,
    read_jsonl,
    resolve_device,
    to_tensor,
)
from semhitok.train import build_datasets, load_run_config

NUM_EXAMPLES = 8
TABLE = ("psnr", "ssim", "rfid", "semantic_cosine", "semantic_usage", "texture_usage", "semantic_perplexity",
         "texture_perplexity", "joint_perplexity")


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(n) (all of them when limit is None or >= n)."""
    if limit is None or limit >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, limit).round().long().tolist()


class Examples:
    """Keeps the first `n` (original, reconstruction) pairs; `image()`: originals over reconstructions, side by side."""

    def __init__(self, n: int = NUM_EXAMPLES):
        self.n, self.originals, self.recons = n, [], []

    def __call__(self, images: torch.Tensor, recons: torch.Tensor) -> None:
        room = self.n - len(self.originals)
        self.originals.extend(images[:room].cpu())
        self.recons.extend(recons[:room].cpu())

    def image(self) -> Image.Image:
        return image_grid([self.originals, self.recons])


def holdout_split(run_dir: Path, size: int) -> Dataset:
    """The held-out images of a tokenizer training run (its `config.yaml`: folders + hashed split)."""
    run = load_run_config(run_dir / "config.yaml")
    return build_datasets(run.train.data, size)[1]


def load(args: argparse.Namespace):
    """-> (model, loader, rFID features or None); raises OSError / ValueError / AssetError with a clear message."""
    device = resolve_device(args.device, option="--device")
    try:
        model = SemHiTok.from_pretrained(args.checkpoint).to(device)
    except (OSError, ValueError) as err:
        raise ValueError(f"--checkpoint {args.checkpoint} is not a usable SemHiTok checkpoint: {err}") from None
    size = args.size or model.config.image_size
    if size != model.config.image_size:
        raise ValueError(f"--size {size} differs from the checkpoint's image_size {model.config.image_size}")
    model.teacher  # noqa: B018 (build it now: missing teacher weights fail here, not mid-run)
    if args.synthetic:
        dataset = ImageFolderDataset(args.synthetic / "images", size)
    else:
        dataset = holdout_split(args.holdout_of, size) if args.holdout_of else ImageFolderDataset(args.data, size)
    subset = Subset(dataset, evenly_spaced(len(dataset), args.limit))
    loader = DataLoader(subset, args.batch_size, num_workers=args.workers, collate_fn=collate_skip_bad)
    return model, loader, None if args.no_fid else fid_features_for(model)


def synthetic_detection(model: SemHiTok, folder: Path, limit: int | None, batch_size: int) -> tuple[dict, dict | None]:
    """The exact detector on reconstructions of a synthetic render's scenes (the same evenly spaced `limit`): accuracy
    per attribute, and GenEval's summary of the reconstructions of the scenes rendered for a GenEval entry (the
    ceiling on generation through this tokenizer; None when the render has no such scene)."""
    rows = [row for _, row in read_jsonl(folder / "scenes.jsonl")]
    rows = [rows[i] for i in evenly_spaced(len(rows), limit)]
    images = torch.stack([to_tensor(load_image(folder / r["image"], model.config.image_size)) for r in rows])
    accuracy, _, pil = reconstruct_and_detect(model, images, [Scene.from_dict(r["scene"]) for r in rows], batch_size)
    return accuracy, judge_images([r.get("geneval") for r in rows], pil)


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="SemHiTok.save_pretrained folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="image folder (flat or class sub-folders)")
    source.add_argument("--holdout-of", type=Path, help="a tokenizer training run folder: evaluate its held-out split")
    source.add_argument("--synthetic", type=Path, help="a synthetic render (scenes.jsonl + images/): metrics and the "
                        "exact detector's accuracy on the reconstructions")
    p.add_argument("--size", type=positive_int, default=None, help="crop size (default and only valid value: the "
                   "checkpoint's image size)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate N images spread evenly over the folder")
    p.add_argument("--out", type=Path, default=Path("outputs/reconstruction"))
    p.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception forward passes)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--gate", type=gate, action="append", default=[], metavar="KEY=MIN",
                   help="fail (exit 1) unless this result reaches MIN, e.g. detector.shape=0.9 or psnr=24; repeatable")
    args = p.parse_args(argv)
    try:
        model, loader, features = load(args)
    except (OSError, ValueError, AssetError, ConfigError) as err:
        p.error(str(err))
    examples = Examples()
    results = evaluate_reconstruction(model, loader, fid=features is not None, fid_features=features, on_batch=examples)
    if results["num_images"] == 0:
        p.error(f"no readable images in {args.data or args.holdout_of} ({results['num_skipped']} skipped)")
    data = f"held-out split of {args.holdout_of.resolve()}" if args.holdout_of else str((args.data or args.synthetic).resolve())
    results = {**results, "checkpoint": str(args.checkpoint.resolve()), "data": data,
               "image_size": model.config.image_size, "protocol": PROTOCOL}
    if args.synthetic:
        try:
            results["detector"], results["geneval_ceiling"] = synthetic_detection(model, args.synthetic, args.limit,
                                                                                  args.batch_size)  # fmt: skip
        except (OSError, ValueError, KeyError) as err:
            p.error(f"--synthetic {args.synthetic}: {err}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    examples.image().save(args.out / "reconstructions.png")
    print(f"{'images':<20} {results['num_images']} ({results['num_skipped']} skipped)")
    for k in TABLE:
        print(f"{k:<20} {'-' if results[k] is None else format(results[k], '.4f')}")
    for k, v in results.get("detector", {}).items():
        print(f"{'detector/' + k:<20} {v:.4f}")
    if ceiling := results.get("geneval_ceiling"):
        tags = ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in ceiling["tags"].items())
        print(f"{'geneval ceiling':<20} {ceiling['overall']:.4f} ({tags}; {ceiling['images']} reconstructions)")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'reconstructions.png'}")
    check_gates(p.prog, results, args.gate)


if __name__ == "__main__":
    main()
