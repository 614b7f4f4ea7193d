#!/usr/bin/env bash
# The paper's central claim in miniature, on real images (docs/tokenizer.md). One command:
#   bash scripts/experiments/tokenizer_claim.sh [CONFIG_DIR [OUT_DIR]]
# (default configs/tokenizer/claim -> runs/claim; configs/tokenizer/claim-long -> runs/claim-long is the longer rerun)
# Stage 1 once (Inception-v3 teacher), then SemHiTok / flat VQ / shared index stage 2 from the same frozen semantic
# branch, in parallel (one thread each), then held-out metrics, a semantic probe on Caltech, and a summary table.
# Re-running resumes every stage from its last complete checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CONFIGS=${1:-configs/tokenizer/claim}
OUT=${2:-runs/claim}
mkdir -p $OUT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

$PY scripts/train_tokenizer.py --config $CONFIGS/stage1.yaml
for kind in hierarchical flat shared; do
  $PY scripts/train_tokenizer.py --config $CONFIGS/stage2-$kind.yaml > $OUT/stage2-$kind.log 2>&1 &
done
wait
for kind in hierarchical flat shared; do
  $PY eval/reconstruction.py --checkpoint $OUT/stage2-$kind/model --holdout-of $OUT/stage2-$kind \
    --out $OUT/eval-$kind > $OUT/eval-$kind.log 2>&1 &
done
$PY eval/semantic_probe.py --checkpoint $OUT/stage2-hierarchical/model --data ../shared/data/real/caltech101-256 \
  --classes 25 --per-class 20 --out $OUT/probe > $OUT/probe.log 2>&1
wait
$PY eval/summarize_reconstruction.py SemHiTok=$OUT/eval-hierarchical/results.json \
  flat-VQ=$OUT/eval-flat/results.json shared-index=$OUT/eval-shared/results.json \
  --probe SemHiTok=$OUT/probe/probe.json | tee $OUT/summary.md
