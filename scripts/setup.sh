#!/usr/bin/env bash
# Create ./.venv and install splitserve with its test extras. On machines
# without a GPU the CPU build of torch is pinned by constraints/cpu.txt.
# Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
CONSTRAINTS=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  CONSTRAINTS=(-c constraints/cpu.txt)
fi
stamp=.venv/.splitserve-installed
want=$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q "${CONSTRAINTS[@]}" -e '.[test]'
  echo "$want" > "$stamp"
fi
