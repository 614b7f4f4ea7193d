"""Render a synthetic-domain dataset with its captions, GenEval metadata, POPE, MME and LLaVA files.

    python scripts/render_synthetic.py --out DIR --num N --size 256 --seed 0

Writes DIR/images/<id>.png, scenes.jsonl (scene, captions, and the GenEval entry the scene was built for, if any),
geneval_metadata.jsonl, pope_{random,popular,adversarial}.jsonl, mme.jsonl and llava.json; image paths are relative
to DIR. Even ids are free random scenes; odd ids are built from GenEval-style entries (tags in turn).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from mllm.synthetic import (
    POPE_STRATEGIES,
    captions,
    llava_conversation,
    mme_questions,
    pope_questions,
    render,
    sample_geneval_entries,
    sample_scene,
    scene_for_entry,
)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def bounded_int(lo: int, hi: int):
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or not lo <= int(text) <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}")
        return int(text)

    return parse


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--num", type=bounded_int(1, 10_000_000), required=True, help="number of images")
    p.add_argument("--size", type=bounded_int(16, 4096), default=256, help="image side in pixels")
    p.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=0)
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")

    rng = np.random.default_rng(args.seed)
    entries = sample_geneval_entries(rng, args.num // 2)
    built = [entries[i // 2] if i % 2 else None for i in range(args.num)]
    scenes = [scene_for_entry(e, rng) if e else sample_scene(rng) for e in built]
    ids = [f"{i:07d}" for i in range(args.num)]
    images = [f"images/{i}.png" for i in ids]

    (args.out / "images").mkdir(parents=True, exist_ok=True)
    for scene, image in zip(scenes, images, strict=True):
        render(scene, args.size).save(args.out / image)
    write_jsonl(
        args.out / "scenes.jsonl",
        [
            {"id": i, "image": im, "scene": s.to_dict(), "captions": captions(s), "geneval": e}
            for i, im, s, e in zip(ids, images, scenes, built, strict=True)
        ],
    )
    write_jsonl(args.out / "geneval_metadata.jsonl", entries)
    for strategy in POPE_STRATEGIES:
        write_jsonl(args.out / f"pope_{strategy}.jsonl", pope_questions(scenes, images, strategy, rng))
    write_jsonl(
        args.out / "mme.jsonl", [q for s, im in zip(scenes, images, strict=True) for q in mme_questions(s, im, rng)]
    )
    llava = [llava_conversation(s, i, im, rng) for s, i, im in zip(scenes, ids, images, strict=True)]
    (args.out / "llava.json").write_text(json.dumps(llava, indent=1))
    print(f"wrote {args.num} images ({args.size}px) and their annotations to {args.out}")


if __name__ == "__main__":
    main()
