#!/usr/bin/env bash
# The GPU check of #15 (fast inference), in one call of about 5 minutes on one H200:
#   1. the CUDA test tier (`pytest -m gpu`: decoding on CUDA with `--device auto`, no host sync per step, the
#      tokenizer's bf16 training step), in the test files that have such tests;
#   2. bench/generate.py in bf16 on CUDA for the demo model's shape (SmolLM2-135M) and a Qwen2.5-1.5B shape, both
#      random weights built in code (no asset, no text tokenizer), plus the LlamaGen-GPT-B-shaped baseline: seconds
#      per image, image tokens/s, the fraction of the HBM bandwidth it measures, host syncs per decoding step.
# It needs only a Python with torch (CUDA), transformers, peft, safetensors, tokenizers and pytest; the repo need not
# be installed (PYTHONPATH is set here). Without a CUDA device it stops at once with one line and status 2.
#
#     bash scripts/gpu_check.sh [OUT_DIR]     (default outputs/gpu_check: pytest.log, bench.log, bench.json)
#     PYTHON=/path/to/python bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${1:-outputs/gpu_check}
export PYTHONPATH="$PWD:$PWD/tokenizer${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: error: no CUDA device ($PY: torch.cuda.is_available() is False, or no torch): run it on a GPU machine" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
"$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors "${files[@]}" 2>&1 | tee "$OUT/pytest.log"
tests=${PIPESTATUS[0]}
"$PY" bench/generate.py --device cuda --models smollm2-shape,qwen2.5-1.5b-shape --precisions bf16 --tokens 256 \
    --prompts 4 --sweep 1,4,16,64 --iters 2 --sync-check --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: pytest -m gpu exit $tests, bench/generate.py exit $bench; logs in $OUT"
exit $((tests || bench))
