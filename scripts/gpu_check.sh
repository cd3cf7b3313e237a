#!/usr/bin/env bash
# The GPU checks and measurements in one run, for a machine with CUDA whose
# Python already has torch, triton, transformers, safetensors, tokenizers,
# jinja2, grpcio, msgpack, msgspec and pytest (Ray is not needed; msgspec is
# not on every GPU image: carry its wheel, see docs/benchmarks.md). Nothing is
# installed: the source tree goes on PYTHONPATH, where splitserve/__init__.py
# finds the top-level folders as its sub-packages (splitserve.engine, ...).
#   bash scripts/gpu_check.sh [OUT_DIR]     (default: ./gpu-results)
# Writes gpu.txt, gpu-tests.xml and one JSON record per benchmark into OUT_DIR; a
# failing step is reported and the next one still runs. Exit status: the
# number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

failed=0
step() {  # step NAME COMMAND...: run it, log it, count a failure
  local name="$1"; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@"; then echo "== $name: ok ($((SECONDS - t0)) s)"
  else echo "== $name: FAILED ($((SECONDS - t0)) s)"; failed=$((failed + 1)); fi
}

step tests "$PY" -m pytest -q -p no:cacheprovider -rA tests/gpu --junitxml="$OUT/gpu-tests.xml"
step kernels "$PY" benchmarks/bench_kernels.py --out "$OUT/kernels.json"
step moe-kernel "$PY" -m benchmarks.bench_moe --out "$OUT/moe.json"
step fp8 "$PY" -m benchmarks.bench_fp8 --device cuda --shape llama-1b --out "$OUT/fp8.json"
step spec "$PY" -m benchmarks.bench_spec --device cuda --out "$OUT/spec.json"
step roofline-1b "$PY" -m benchmarks.bench_engine_roofline --shape llama-1b --out "$OUT/roofline-1b.json"
step roofline-8b "$PY" -m benchmarks.bench_engine_roofline --shape llama-3.1-8b \
  --out "$OUT/roofline-8b.json"
step engine-vs-transformers "$PY" -m benchmarks.bench_engine --device cuda --dtype bfloat16 \
  --out "$OUT/engine-cuda.json"
step transfer "$PY" benchmarks/bench_transfer.py --tuned-malloc --skip-ray --out "$OUT/transfer.json"
echo "failed steps: $failed"
exit "$failed"
