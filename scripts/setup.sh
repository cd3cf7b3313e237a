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
# System tools of the `ray up` test (tests/integration/test_ray_up.py): sshd
# and rsync. Best effort: installed when root with apt-get, otherwise that
# test installs them itself or skips; setup never fails here.
if ! { [ -x /usr/sbin/sshd ] && command -v rsync >/dev/null 2>&1; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends \
      openssh-server openssh-client rsync \
    || { timeout 120 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 \
         apt-get install -y -qq --no-install-recommends openssh-server openssh-client rsync; }; } \
    >/dev/null 2>&1 || echo "setup: could not install openssh-server/rsync; the ray up test will skip" >&2
fi
