#!/usr/bin/env bash
# Regenerate kv_transfer_pb2.py and kv_transfer_pb2_grpc.py from the proto.
# Usage: engine/transfer/gen_proto.sh [OUT_ROOT]   (default: the repo root)
# Generated modules import each other as engine.transfer.*, hence the proto is
# compiled from the repo root by its repo-relative path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$ROOT}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$OUT"
cd "$ROOT"
"$PYTHON" -m grpc_tools.protoc -I . --python_out="$OUT" --grpc_python_out="$OUT" \
    engine/transfer/kv_transfer.proto
