"""Write a synthetic-domain dataset folder: images plus every annotation file the framework reads.

Layout (image paths inside every file are relative to the folder):
  images/<id>.png, scenes.jsonl (scene, its objects' boxes, captions, the GenEval entry it was built for or null; that
  entry's prompt is also the scene's last caption, so text-to-image training sees GenEval's own phrasing; its region
  description, one of the captions, also alone as `description`, so `data.t2i_captions` can weight it),
  geneval_metadata.jsonl, pope_{random,popular,adversarial}.jsonl, mme.jsonl, llava.json (1-4 independent, balanced
  questions per record, `conversations` records per image: `questions.sample_questions`), probe.jsonl (attribute
  targets per image for the tokenizer's code probes: semhitok.attribute_probe.ProbeSet).
Even ids are free random scenes; odd ids are built from GenEval-style entries (the six tags in turn).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mllm.synthetic.probe_targets import probe_targets
from mllm.synthetic.questions import (
    POPE_STRATEGIES,
    CategoryStats,
    llava_conversation,
    mme_questions,
    pope_questions,
    sample_geneval_entries,
    scene_for_entry,
)
from mllm.synthetic.render import render
from mllm.synthetic.scene import Scene, sample_scene
from mllm.synthetic.text import captions, describe


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sample_dataset_scenes(num: int, rng: np.random.Generator) -> tuple[list[Scene], list[dict | None], list[dict]]:
    """(scenes, the entry each scene was built for or None, all entries): even ids free, odd ids from entries."""
    entries = sample_geneval_entries(rng, num // 2)
    built = [entries[i // 2] if i % 2 else None for i in range(num)]
    scenes = [scene_for_entry(e, rng) if e else sample_scene(rng) for e in built]
    return scenes, built, entries


def write_dataset(out: Path, num: int, size: int = 256, seed: int = 0, conversations: int = 1) -> Path:
    """Render `num` scenes at `size` px with seed `seed` into `out` (created). Deterministic. Returns `out`.
    `conversations`: independent LLaVA records per image in llava.json (ids "<id>" then "<id>-1", "<id>-2", ...); the
    first record of every image, and every other file, are the same whatever the number."""
    if conversations < 1:
        raise ValueError(f"conversations must be >= 1, got {conversations}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    scenes, built, entries = sample_dataset_scenes(num, rng)
    ids = [f"{i:07d}" for i in range(num)]
    images = [f"images/{i}.png" for i in ids]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for scene, image in zip(scenes, images, strict=True):
        render(scene, size).save(out / image)
    rows = zip(ids, images, scenes, built, strict=True)
    write_jsonl(
        out / "scenes.jsonl",
        [
            {"id": i, "image": im, "scene": s.to_dict(), "boxes": [list(o.bbox) for o in s.objects],
             "captions": captions(s) + ([e["prompt"]] if e else []), "description": describe(s),
             "geneval": e}  # fmt: skip
            for i, im, s, e in rows
        ],
    )
    write_jsonl(out / "geneval_metadata.jsonl", entries)
    for strategy in POPE_STRATEGIES:
        write_jsonl(out / f"pope_{strategy}.jsonl", pope_questions(scenes, images, strategy, rng))
    pairs = zip(scenes, images, strict=True)
    write_jsonl(out / "mme.jsonl", [q for s, im in pairs for q in mme_questions(s, im, rng)])
    stats = CategoryStats.of(scenes)
    llava = [llava_conversation(s, i + (f"-{k}" if k else ""), im, rng, stats=stats)
             for k in range(conversations) for s, i, im in zip(scenes, ids, images, strict=True)]  # fmt: skip
    (out / "llava.json").write_text(json.dumps(llava, indent=1))
    targets = probe_targets(scenes)
    write_jsonl(out / "probe.jsonl", [{"image": im, "targets": {t: v[k].tolist() for t, v in targets.items()}}
                                      for k, im in enumerate(images)])  # fmt: skip
    return out
