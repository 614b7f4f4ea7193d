#!/usr/bin/env bash
# The held-out measurements of docs/demo.md "Scores" for one MLLM folder, each result in OUT:
#   geneval  synthetic GenEval, 96 held-out prompts (16 per tag) x 2 images, CFG 3, at each sampling seed
#            (OUT/geneval-s<seed>/results.json; the mean over the seeds printed at the end)
#   geneval-expand  the same with prompt expansion (`--expand`: the model writes each prompt out as a scene
#            description, then draws it; OUT/geneval-expand-s<seed>/)
#   layout   drawing from a written layout: eval/diagnose.py layout-dependence (100 scenes: object-cell NLL after the
#            region description vs its regions mirrored) and GenEval of the first 64 position and 64 counting scenes
#            with their own region description as the prompt (scripts/experiments/layout_prompts.py), 2 images each
#            per seed (OUT/layout-<tag>-s<seed>/)
#   diag     eval/diagnose.py image-dependence / counts (200 questions), caption-dependence (100 scenes)
#   lmms     eval/run_lmms.py --tasks demo_pope,demo_mme --limit 300 on tasks built from the same scenes
#
#   bash scripts/experiments/eval_mllm.sh MODEL OUT [SEEDS="0 1 2"] [PARTS="geneval diag lmms"; also geneval-expand, layout]
#
# MODEL: an MLLM folder (<train.out_dir>/model, mllm/demo/mllm). Needs the held-out scenes of docs/demo.md:
#   python scripts/render_synthetic.py --out runs/demo/data/heldout --num 1000 --size 64 --seed 1
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 MODEL OUT [SEEDS] [PARTS]" >&2; exit 2; }
model=$1 out=$2 seeds=${3:-0 1 2} parts=${4:-geneval diag lmms}
data=${HELDOUT:-runs/demo/data/heldout}
py=${PYTHON:-.venv/bin/python}
[ -d "$model" ] || { echo "error: no MLLM folder $model" >&2; exit 2; }
[ -f "$data/geneval_metadata.jsonl" ] || { echo "error: $data has no held-out scenes; render them (see $0)" >&2; exit 2; }
mkdir -p "$out"
for part in $parts; do
  case $part in
    geneval|geneval-expand)
      flag=$([ $part = geneval-expand ] && echo --expand || true)
      for seed in $seeds; do
        dir=$out/$part-s$seed
        [ -f "$dir/results.json" ] && continue
        $py eval/geneval.py generate --checkpoint "$model" --metadata "$data/geneval_metadata.jsonl" --out "$dir" \
          --cfg 3 --num-images 2 --limit 96 --seed "$seed" $flag
        $py eval/geneval.py score --images "$dir" | tail -n 8
      done
      $py - "$out/$part" $seeds <<'EOF'
import json, sys
from pathlib import Path
out, seeds = sys.argv[1], sys.argv[2:]
runs = [json.loads(Path(f"{out}-s{s}", "results.json").read_text()) for s in seeds]
tags = {t: [r["summary"]["tags"][t]["accuracy"] for r in runs] for t in runs[0]["summary"]["tags"]}
overall = [r["summary"]["overall"] for r in runs]
print(f"GenEval overall per seed {[round(v, 3) for v in overall]}, mean {sum(overall) / len(overall):.3f}; tags (mean):",
      ", ".join(f"{t} {sum(v) / len(v):.2f}" for t, v in tags.items()))
EOF
      ;;
    layout)
      $py eval/diagnose.py layout-dependence --model "$model" --data "$data" --n 100 --out "$out/layout-dependence.json"
      for tag in position counting; do
        $py scripts/experiments/layout_prompts.py "$data" --tag $tag --limit 64 --out "$out/layout-$tag.jsonl"
        for seed in $seeds; do
          dir=$out/layout-$tag-s$seed
          [ -f "$dir/results.json" ] || $py eval/geneval.py generate --checkpoint "$model" --metadata "$out/layout-$tag.jsonl" \
            --out "$dir" --cfg 3 --num-images 2 --seed "$seed" > /dev/null
          echo "layout $tag seed $seed: $($py eval/geneval.py score --images "$dir" | grep "^$tag ")"
        done
      done
      ;;
    diag)
      $py eval/diagnose.py image-dependence --model "$model" --data "$data" --n 200 --out "$out/image-dependence.json"
      $py eval/diagnose.py counts --model "$model" --data "$data" --n 200 --out "$out/counts.json"
      $py eval/diagnose.py caption-dependence --model "$model" --data "$data" --n 100 --out "$out/caption-dependence.json"
      ;;
    lmms)
      $py eval/build_lmms_tasks.py synthetic --data "$data" --out "$out/lmms_tasks" --name demo
      $py eval/run_lmms.py --tasks demo_pope,demo_mme --model-path "$model" --include-path "$out/lmms_tasks" \
        --limit 300 --output "$out/lmms"
      ;;
    *) echo "error: unknown part $part (geneval, geneval-expand, layout, diag, lmms)" >&2; exit 2 ;;
  esac
done
