#!/usr/bin/env bash
# Set up the generation runtimes the tests check exports with, in their own environments under
# .venv-runtimes/ (git-ignored). Safe to run repeatedly: an environment whose pinned requirements
# are already installed is left alone (a stamp file records them).
#
#   .venv-runtimes/genai    onnxruntime-genai (with the CPU `onnxruntime` it depends on) and what
#                           its model builder imports (torch CPU, transformers 5, onnx-ir, onnx).
#                           Separate from .venv because `onnxruntime` and `onnxruntime-gpu` install
#                           the same `onnxruntime` package and would overwrite each other.
#   .venv-runtimes/optimum  Optimum's ORTModelForCausalLM. No Optimum release supports transformers
#                           5: optimum-onnx 0.1.0 (the latest) requires transformers<4.58 and fails
#                           to import on 5.x, so this environment has the transformers pip resolves
#                           for it (4.57). It only reads config.json there, not the checkpoint.
#
# Wheels only (`--only-binary=:all:`); torch is pinned to the CPU build (an unpinned torch pulls a
# multi-GB CUDA build). SHARDEX_SKIP_RUNTIMES=1 skips this script; the runtime tests then skip.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${SHARDEX_SKIP_RUNTIMES:-0}" == 1 ]]; then
    echo "runtimes: skipped (SHARDEX_SKIP_RUNTIMES=1)" >&2
    exit 0
fi
PYTHON="${PYTHON:-python3}"
ROOT=.venv-runtimes
TORCH="torch==2.13.0"

# make_env NAME REQUIREMENT...: create .venv-runtimes/NAME with exactly these pins, unless it already has them.
make_env() {
    local dir="$ROOT/$1" stamp="$ROOT/$1/.requirements"
    shift
    local wanted="$*"
    if [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        return 0
    fi
    local start=$SECONDS
    [[ -x "$dir/bin/python" ]] || "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: "$@" 2>&1 |
        { grep -v "^WARNING: Location" >&2 || true; }
    "$dir/bin/python" -m pip check >/dev/null
    echo "$wanted" >"$stamp"
    echo "runtimes: $dir set up in $((SECONDS - start)) s ($(du -sh "$dir" | cut -f1))" >&2
}

make_env genai "onnxruntime-genai==0.18.0" "$TORCH" "transformers==5.24.0" "onnx-ir==1.1.0" "onnx>=1.18" "numpy>=1.26"
make_env optimum "optimum-onnx[onnxruntime]==0.1.0" "$TORCH"
