#!/usr/bin/env bash
# Set up (or refresh) .venv with shardex and its test extras. Safe to run repeatedly.
# torch is installed pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The generation runtimes (onnxruntime-genai, Optimum), in their own environments, for the tests.
bash scripts/setup_runtimes.sh
echo "shardex is set up in $(pwd)/.venv" >&2
