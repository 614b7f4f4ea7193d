"""How often the model's prompt expansion keeps what a GenEval-style prompt asks: the number of objects, and for a
position prompt the relation in the region words it writes (text only, no image drawn).

    python scripts/experiments/expansion_check.py --checkpoint mllm/demo/mllm \
        --metadata runs/demo/data/heldout/geneval_metadata.jsonl --limit 96

Per tag: the share of expansions whose object count equals the prompt's, and (position) whose region words put the
two objects on the asked sides (`mllm.synthetic.text.region`: thirds of the image), with a few examples.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

from mllm.evaluation.geneval import expand_entries, load_metadata
from mllm.sampling import load_for_inference

NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
REGION = r"(?:at|on|in) the (?:(?:top|bottom) (?:left|right)|top|bottom|left|right|center)"  # `text.region`
SIDE = {"right of": (0, 1), "left of": (0, -1), "above": (1, -1), "below": (1, 1)}  # (axis, sign of a - b)


def place(description: str, shape: str) -> tuple[int, int] | None:
    """(column, row) in thirds (0..2) of the first `shape` the description places, None if it names none."""
    m = re.search(rf"({REGION}) an? [a-z]+ {shape}\b", description)  # region first (`describe`)
    m = m or re.search(rf"\b{shape} ({REGION})\b", description)  # region after (descriptions before session 17)
    if not m:
        return None
    words = m.group(1)
    return (0 if "left" in words else 2 if "right" in words else 1, 0 if "top" in words else 2 if "bottom" in words else 1)


def check(entry: dict, description: str) -> dict:
    m = re.match(r"There (?:is|are) (\w+) objects?", description)
    written = NUMBERS.get(m.group(1)) if m else None
    asked = sum(o["count"] for o in entry["include"])
    out = {"count": written == asked}
    if entry["tag"] == "position":
        b, a = entry["include"]
        pa, pb = place(description, a["class"]), place(description, b["class"])
        axis, sign = SIDE[a["position"][0]]
        out["relation"] = bool(pa and pb and (pa[axis] - pb[axis]) * sign > 0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("mllm/demo/mllm"))
    p.add_argument("--metadata", type=Path, required=True)
    p.add_argument("--limit", type=int, default=96)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    run = load_for_inference(args.checkpoint, precision="auto")
    entries = expand_entries(run, load_metadata(args.metadata)[: args.limit])
    tally = defaultdict(lambda: defaultdict(list))
    for e in entries:
        for k, v in check(e, e["prompt"]).items():
            tally[e["tag"]][k].append(v)
    for tag, checks in tally.items():
        print(f"{tag:<14}", "  ".join(f"{k} {sum(v) / len(v):.2f} ({len(v)})" for k, v in checks.items()))
    for e in [e for e in entries if e["tag"] == "position"][:4]:
        print(f"  {e['original_prompt']!r} -> {e['prompt']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
