#!/usr/bin/env bash
# Reproduce the shipped demo checkpoints (mllm/demo/) from scratch with the project's own scripts, then evaluate them.
#   bash configs/demo/reproduce.sh          (after `make install assets`; times on 2 CPU cores are in docs/demo.md)
# Every step resumes or skips finished work when re-run (renders are deterministic; training resumes from its last
# complete checkpoint; the code cache resumes by shard).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}

[ -f runs/demo/data/train/llava.json ] || $PY scripts/render_synthetic.py --out runs/demo/data/train --num 10000 --size 64 --seed 0 --conversations 4
[ -f runs/demo/data/heldout/probe.jsonl ] || $PY scripts/render_synthetic.py --out runs/demo/data/heldout --num 1000 --size 64 --seed 1
$PY scripts/train_tokenizer.py --config configs/demo/tokenizer-stage1.yaml
# stage-1 gate: shape read from the student >= 0.85 and from the semantic codes >= 0.80 (docs/tokenizer.md)
$PY eval/probe_codes.py --checkpoint runs/demo/tokenizer-stage1/model --scenes 5000 --epochs 30 --out runs/demo/probe-stage1 \
    --gate student.shape=0.85 --gate semantic_codes.shape=0.80
$PY scripts/train_tokenizer.py --config configs/demo/tokenizer-stage2.yaml
# stage 2b: the decoder alone on the frozen stage-2 codes (the codes the MLLM learns do not change)
$PY scripts/train_tokenizer.py --config configs/demo/tokenizer-stage2b.yaml
# stage-2 gate: the exact detector on reconstructions, count / colour / position >= 0.95, shape >= 0.90
$PY eval/reconstruction.py --checkpoint runs/demo/tokenizer-stage2b/model --synthetic runs/demo/data/heldout --no-fid \
    --out runs/demo/reconstruction-stage2b --gate detector.count=0.95 --gate detector.color=0.95 \
    --gate detector.position=0.95 --gate detector.shape=0.90
$PY scripts/extract_codes.py --tokenizer runs/demo/tokenizer-stage2/model --images runs/demo/data/train/scenes.jsonl \
    --out runs/demo/codes --size 64 --workers 1
# the MLLM in stages (configs/demo/mllm/): adapter alignment, instruction tuning, text to image, joint, a
# generation-heavy joint phase that draws the GenEval-style prompts half the time (joint-prompts), and the same mix
# with caption -> scene-description conversations for prompt expansion (expand); each stage starts from the
# previous one's model (adapter, rows, head and the one LoRA carried on) and logs the learning diagnostics (image /
# caption dependence on the held-out scenes) every 100 steps
[ -f runs/demo/data/train/llava-expand.json ] || $PY scripts/experiments/expansion_data.py runs/demo/data/train \
    --out runs/demo/data/train/llava-expand.json --copies 2
for stage in align instruct t2i joint joint-prompts expand; do
    $PY scripts/train_mllm.py --config configs/demo/mllm/$stage.yaml
done
$PY scripts/package_demo.py --tokenizer runs/demo/tokenizer-stage2b/model --mllm runs/demo/mllm-expand/model --out mllm/demo
$PY scripts/demo.py --checkpoint mllm/demo/mllm --out outputs/demo-reproduced --geneval-prompts 120 --heldout 100
