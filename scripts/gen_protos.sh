#!/usr/bin/env bash
# Regenerate the Python modules of every .proto in the tree: the client API
# (cluster/api/proto, with .pyi stubs) and the KV transfer plane
# (handoff/transfer).
# Usage: scripts/gen_protos.sh [OUT_ROOT]   (default: the repo root)
# Files land under OUT_ROOT at their folders' repo-relative paths. The
# generated modules import each other as splitserve.<folder>..., so the
# protos are compiled by their paths inside a splitserve/ view of the tree.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT}" && cd "${1:-$ROOT}" && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
view="$(mktemp -d)"
gen="$(mktemp -d)"
trap 'rm -rf "$view" "$gen"' EXIT
mkdir -p "$view/splitserve"
ln -s "$ROOT/cluster" "$view/splitserve/cluster"
ln -s "$ROOT/handoff" "$view/splitserve/handoff"
cd "$view"
"$PYTHON" -m grpc_tools.protoc -I . --python_out="$gen" --pyi_out="$gen" --grpc_python_out="$gen" \
    splitserve/cluster/api/proto/splitserve.proto splitserve/cluster/api/proto/health.proto
"$PYTHON" -m grpc_tools.protoc -I . --python_out="$gen" --grpc_python_out="$gen" \
    splitserve/handoff/transfer/kv_transfer.proto
for dir in cluster/api/proto handoff/transfer; do
  mkdir -p "$OUT/$dir"
  cp "$gen/splitserve/$dir"/* "$OUT/$dir/"
done
