"""Prompt-expansion conversations for a rendered scene set: a caption in, the scene's region description out.

    python scripts/experiments/expansion_data.py runs/demo/data/train --out runs/demo/data/train/llava-expand.json \
        --copies 2

Reads DATA/scenes.jsonl and DATA/llava.json (`scripts/render_synthetic.py`) and writes OUT: every conversation of
llava.json, then `--copies` text-only conversations per scene (no image): the human turn is
`mllm.constants.EXPANSION_PROMPT` around one of the scene's captions (its GenEval-style prompt half the time where it
has one, else a short caption style), the answer the scene's detailed description ("There are two objects on a light
checkered background: a black diamond at the top left and an orange circle on the right."). A model trained on them
writes such a layout for a caption before drawing (`eval/geneval.py generate --expand`): the region description is
a training caption style that the generator follows better than the short prompt (docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mllm.constants import EXPANSION_PROMPT
from mllm.synthetic.text import is_description
from semhitok.runtime import read_json, read_jsonl


def expansion_samples(scenes: list[dict], copies: int, seed: int = 0) -> list[dict]:
    """`copies` LLaVA text-only conversations per scene (caption -> its description), drawn with `seed`."""
    rng, out = np.random.default_rng(seed), []
    for record in scenes:
        description = next((c for c in record["captions"] if is_description(c)), None)
        if description is None:
            raise ValueError(f"scene {record['id']} has no region description among its captions")
        short = [c for c in record["captions"] if not is_description(c)]
        prompt = (record.get("geneval") or {}).get("prompt")
        for k in range(copies):
            caption = prompt if prompt and rng.random() < 0.5 else short[rng.integers(len(short))]
            out.append({"id": f"expand-{record['id']}-{k}", "conversations": [
                {"from": "human", "value": EXPANSION_PROMPT.format(caption=caption)},
                {"from": "gpt", "value": description}]})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a folder of scripts/render_synthetic.py (scenes.jsonl, llava.json)")
    p.add_argument("--out", type=Path, required=True, help="LLaVA JSON to write (the conversations + expansions)")
    p.add_argument("--copies", type=int, default=1, help="expansion conversations per scene")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    scenes_path, llava_path = args.data / "scenes.jsonl", args.data / "llava.json"
    for path in (scenes_path, llava_path):
        if not path.is_file():
            print(f"error: {path} not found: render scenes with scripts/render_synthetic.py", file=sys.stderr)
            return 2
    conversations = read_json(llava_path)
    extra = expansion_samples([r for _, r in read_jsonl(scenes_path)], args.copies, args.seed)
    args.out.write_text(json.dumps(conversations + extra))
    print(f"{len(conversations)} conversations + {len(extra)} expansions -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
