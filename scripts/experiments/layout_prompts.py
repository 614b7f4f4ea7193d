"""GenEval entries of rendered scenes with the scene's own region description as the prompt (a layout written out).

    python scripts/experiments/layout_prompts.py runs/demo/data/heldout --tag position --limit 64 --out /tmp/pos.jsonl
    python scripts/experiments/layout_prompts.py runs/demo/data/heldout --tag position --limit 64 --out /tmp/orig.jsonl \
        --keep-prompt

Reads DATA/scenes.jsonl (`scripts/render_synthetic.py`) and writes the GenEval metadata of its first `--limit` scenes
built for `--tag`, each prompt replaced by the scene's detailed description ("There are two objects on a light
checkered background: a black diamond at the top left and an orange circle on the right.", a training caption style;
`mllm.synthetic.text.describe`), or kept with `--keep-prompt` (the same entries as asked). Generating and scoring both
(`eval/geneval.py generate` / `score`) tells whether a model that is told where each object goes draws them
(docs/demo.md, "What limits the scores"). The judge reads the entry's requirements, never the prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mllm.synthetic import GENEVAL_TAGS
from mllm.synthetic.text import is_description
from semhitok.runtime import read_jsonl


def layout_entries(scenes: list[dict], tag: str, limit: int, keep_prompt: bool) -> list[dict]:
    """The GenEval entries of the first `limit` scenes made for `tag`, prompts replaced by their descriptions."""
    out = []
    for record in scenes:
        entry = record.get("geneval")
        if not entry or entry["tag"] != tag:
            continue
        description = next((c for c in record["captions"] if is_description(c)), None)
        if description is None:
            raise ValueError(f"scene {record['id']} has no region description among its captions")
        out.append(entry if keep_prompt else {**entry, "prompt": description})
        if len(out) == limit:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a folder of scripts/render_synthetic.py (with scenes.jsonl)")
    p.add_argument("--tag", choices=GENEVAL_TAGS, required=True)
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--keep-prompt", action="store_true", help="keep the GenEval prompts (the baseline set)")
    p.add_argument("--out", type=Path, required=True, help="GenEval metadata JSONL to write")
    args = p.parse_args(argv)
    path = args.data / "scenes.jsonl"
    if not path.is_file():
        print(f"error: {path} not found: render scenes with scripts/render_synthetic.py", file=sys.stderr)
        return 2
    entries = layout_entries([record for _, record in read_jsonl(path)], args.tag, args.limit, args.keep_prompt)
    if not entries:
        print(f"error: no scene of {path} was built for the {args.tag} tag", file=sys.stderr)
        return 2
    args.out.write_text("".join(json.dumps(e) + "\n" for e in entries))
    print(f"{len(entries)} {args.tag} entries -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
