#!/usr/bin/env bash
# The reference venv for `macq baseline --runner gptq|awq`: llm-compressor 0.14.0.1 pins transformers<=5.17
# and numpy 2.4.6, which clash with macq's own set, so it gets its own venv, driven as a subprocess that
# exchanges files only (macq/baselines/llmc_worker.py). CPU torch first (the 2.13.0 wheel pip finds
# locally, so nothing pulls a multi-GB CUDA build), then llm-compressor from wheels (~1 min).
#   bash scripts/setup_reference_venv.sh            # -> .venv-llmc at the repo root
#   MACQ_LLMC_VENV=/path bash scripts/setup_reference_venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MACQ_LLMC_VENV:-.venv-llmc}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "llmcompressor==0.14.0.1"
"$VENV/bin/python" -c "import llmcompressor, torch; print('llm-compressor', llmcompressor.__version__, 'torch', torch.__version__)"
