#!/usr/bin/env bash
# Install (if needed) and start a local splitserve cluster on the embedded
# default model, serving the OpenAI HTTP API (:8000) and the gRPC API (:50051).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/splitserve serve "$@"
