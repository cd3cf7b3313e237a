#!/usr/bin/env bash
# Regenerate the Python modules (and .pyi stubs) of the client API protos.
# Usage: cluster/proto/gen.sh [OUT_ROOT]   (default: the repo root)
# Generated modules import each other as cluster.proto.*, hence the protos
# are compiled from the repo root by their repo-relative paths.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$ROOT}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$OUT"
cd "$ROOT"
"$PYTHON" -m grpc_tools.protoc -I . --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    cluster/proto/splitserve.proto cluster/proto/health.proto
