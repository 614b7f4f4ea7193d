"""Best-of-N reranking by the model's own understanding, measured: which score picks the images the GenEval judge
accepts?

    python scripts/experiments/rerank_study.py --checkpoint mllm/demo/mllm \
        --metadata runs/demo/data/heldout/geneval_metadata.jsonl --limit 96 --num-images 2 --best-of 4 --expand \
        --seed 0 --out runs/demo/rerank/seed0.json

For each prompt it draws num_images x best_of candidates (CFG 3, the sampler's defaults), judges every candidate with
the exact detector, and scores it with `caption_nll` (below) under several captions (the prompt as asked; with
--expand also the model's expansion). Writes one row per candidate and prints the GenEval summary of: the first
candidate of each image (no reranking: what `eval/geneval.py generate` draws), each score's pick, and the oracle (a
correct candidate whenever there is one).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from mllm.conversation import GPT, HUMAN, tokenize_conversation
from mllm.data.mixture import BRIEF_INSTRUCTIONS, UNDERSTANDING, LMSample, collate_lm
from mllm.evaluation.geneval import expand_entries, load_metadata, summarize
from mllm.sampling import SamplingConfig, eval_mode, generate_images, load_for_inference, model_template
from mllm.synthetic import score_geneval
from semhitok.runtime import to_pil


@torch.no_grad()
def caption_nll(model, tokenizer, image_ids: torch.Tensor, captions: list[str], batch: int = 32) -> torch.Tensor:
    """(B,) NLL in nats, summed over the caption's tokens, of each caption as the answer to LLaVA's first
    brief-description instruction about its image (the generated ids, no decode / re-encode): how well the model's
    own understanding reads the image as the caption."""
    conversation, samples = model_template(model, "auto", tokenizer), []
    for row, caption in zip(image_ids.cpu(), captions, strict=True):
        turns = [{"from": HUMAN, "value": f"<image>\n{BRIEF_INSTRUCTIONS[0]}"}, {"from": GPT, "value": caption}]
        tok = tokenize_conversation(turns, tokenizer, conversation, max_length=sys.maxsize)
        samples.append(LMSample(*model.vocab.expand_placeholders(tok.input_ids, tok.labels, row[None]), UNDERSTANDING))
    out = []
    with eval_mode(model):
        for start in range(0, len(samples), batch):
            b = collate_lm(samples[start : start + batch], pad_id=0)
            out.append(model.sequence_nll(*(b[k] for k in ("input_ids", "attention_mask", "labels")))["text"])
    return torch.cat(out).float().cpu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("mllm/demo/mllm"))
    p.add_argument("--metadata", type=Path, required=True)
    p.add_argument("--limit", type=int, default=96)
    p.add_argument("--num-images", type=int, default=2)
    p.add_argument("--best-of", type=int, default=4)
    p.add_argument("--expand", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=8, help="prompts per generation call")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    run = load_for_inference(args.checkpoint, precision="auto")
    entries = load_metadata(args.metadata)[: args.limit]
    entries = expand_entries(run, entries) if args.expand else entries
    n, k = args.num_images, args.best_of
    cfg = SamplingConfig(cfg_scale=3.0)
    rows = []
    for start in range(0, len(entries), args.chunk):
        chunk = entries[start : start + args.chunk]
        grid = generate_images(run.model, [e["prompt"] for e in chunk],
                               replace(cfg, num_images=n * k, seed=args.seed + start * n * k), tokenizer=run.tokenizer)
        ids = run.model.vocab.to_ids(grid)  # (P·n·k, h·w)
        images = [to_pil(x) for x in run.decode(grid)]
        asked = [e.get("original_prompt", e["prompt"]) for e in chunk for _ in range(n * k)]
        scores = {"asked": caption_nll(run.model, run.tokenizer, ids, asked)}
        if args.expand:
            scores["expanded"] = caption_nll(run.model, run.tokenizer, ids, [e["prompt"] for e in chunk
                                                                             for _ in range(n * k)])
        for r, image in enumerate(images):
            e = chunk[r // (n * k)]
            correct = bool(score_geneval(e, image)[0])
            rows.append({"prompt": start + r // (n * k), "tag": e["tag"], "slot": (r % (n * k)) // k,
                         "candidate": r % k, "correct": correct, **{s: float(v[r]) for s, v in scores.items()}})
        print(f"{start + len(chunk)}/{len(entries)} prompts", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k_: str(v) for k_, v in vars(args).items()}, "rows": rows}))
    report(rows, k)
    return 0


def report(rows: list[dict], k: int) -> None:
    """GenEval summaries: first candidate, each score's pick, oracle."""
    groups = [rows[i : i + k] for i in range(0, len(rows), k)]
    rules = {"first": lambda g: g[0]}
    for name in [s for s in ("asked", "expanded") if s in rows[0]]:
        rules[name] = lambda g, name=name: min(g, key=lambda c: c[name])
    if "expanded" in rows[0]:
        rules["sum"] = lambda g: min(g, key=lambda c: c["asked"] + c["expanded"])
    rules["oracle"] = lambda g: next((c for c in g if c["correct"]), g[0])
    for name, rule in rules.items():
        picked = [rule(g) for g in groups]
        s = summarize([{"tag": c["tag"], "metadata": str(c["prompt"]), "correct": c["correct"]} for c in picked])
        tags = " ".join(f"{t[:6]} {v['accuracy']:.2f}" for t, v in s["tags"].items())
        print(f"{name:<9} overall {s['overall']:.3f}  {tags}")


if __name__ == "__main__":
    sys.exit(main())
