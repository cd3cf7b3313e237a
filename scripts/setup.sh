#!/usr/bin/env bash
# Create ./.venv and install splitserve with its test extras. On machines
# without a GPU the CPU build of torch is pinned by constraints/cpu.txt and
# every other package to the tested versions in constraints/lock.txt
# (SPLITSERVE_UNLOCKED=1 installs the newest releases instead).
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
  if [ "${SPLITSERVE_UNLOCKED:-0}" != 1 ]; then
    CONSTRAINTS+=(-c constraints/lock.txt)
  fi
fi
stamp=.venv/.splitserve-installed
want=$( (cat pyproject.toml constraints/*.txt; echo "${CONSTRAINTS[*]}") | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q "${CONSTRAINTS[@]}" -e '.[test]'
  echo "$want" > "$stamp"
fi
