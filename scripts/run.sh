#!/usr/bin/env bash
# Install (if needed) and run splitserve on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/splitserve generate "$@"
