"""Measure a device's peaks: a large matmul (FLOP/s per dtype) and a large
device-to-device copy (bytes/s), the two figures the roofline reads.
The result is a *measured* hardware row, which wins over a catalog row of
the same key."""

from __future__ import annotations

import os
import time

import torch

from splitserve.cluster.planning.hardware import Efficiency, Hardware, catalog, host_name, local_cpu_key
from splitserve.cluster.planning.records import MEASURED


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / _best(lambda: a @ b, device, reps)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best(lambda: dst.copy_(src), device, reps)  # read + write


def _memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 0.0


def cuda_catalog_key(name: str) -> str | None:
    """The catalog entry a CUDA device name matches, e.g. 'NVIDIA H100 80GB HBM3' -> h100-sxm."""
    low = name.lower()
    for key, needle in (("h200", "h200"), ("h100-sxm", "h100"), ("a100-80gb", "a100"),
                        ("l40s", "l40s"), ("mi300x", "mi300")):
        if needle in low:
            return key
    return None


def measure_device(device: str = "cpu", fast: bool = False) -> Hardware:
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        key = cuda_catalog_key(name) or f"cuda:{name}"
        n, nbytes = (4096, 256 << 20) if fast else (8192, 1 << 30)
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    else:
        name, key = local_cpu_key().split(":", 1)[1], local_cpu_key()
        n, nbytes = (256, 16 << 20) if fast else (1024, 128 << 20)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    peaks = {d: matmul_flops(dev, t, n, reps=2 if fast else 5) for d, t in dtypes.items()}
    bw = copy_bandwidth(dev, nbytes, reps=2 if fast else 5)
    ref = catalog().get(key)
    # a measured row states what was measured; links and price come from the
    # catalog entry of the same device where there is one
    return Hardware(
        key=key, name=name, peak_flops=peaks, memory_bandwidth=bw,
        memory_bytes=_memory_bytes(dev) or (ref.memory_bytes if ref else 1.0),
        intra_node_bandwidth=ref.intra_node_bandwidth if ref else bw,
        network_bandwidth=ref.network_bandwidth if ref else bw,
        price_per_hour=ref.price_per_hour if ref else None,
        price_source=ref.price_source if ref else "",
        source=f"measured by splitserve profile ({n}x{n} matmul, {nbytes >> 20} MiB copy)",
        provenance=MEASURED, host=host_name(),
        # measured peaks are already achieved rates: the roofline uses them as they are
        efficiency=Efficiency(matmul=1.0, memory=1.0, network=1.0,
                              tensor_parallel=ref.efficiency.tensor_parallel if ref else 0.9,
                              step_overhead_s=0.0 if dev.type == "cpu" else 0.002))
