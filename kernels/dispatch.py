"""One registry of kernel backends, chosen by name.

Backends: ``reference`` (torch, every device), ``triton`` (CUDA, or CPU
under ``TRITON_INTERPRET=1`` for tests) and ``cpu`` (torch, laid out for
what the CPU math libraries do fastest; only the ops where that differs).
Tensors on CUDA use ``triton`` when it is importable, tensors on the CPU use
``cpu``; an op a backend leaves out runs the reference. Tests and operators
override the choice with ``force_backend`` or ``SPLITSERVE_KERNELS``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Callable, Iterator

import torch

from splitserve.kernels import fp8_gemm, lora, recurrent, reference

OP_NAMES = (
    "linear",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_tanh_and_mul",
    "store_kv",
    "paged_attention",
    "paged_decode_attention",
    "pack_kv",
    "unpack_kv",
    "fused_moe",
    "fp8_w8a16_linear",
    "fp8_w8a8_linear",
    "fp8_fused_moe",
    "lora_shrink",
    "lora_expand",
    "gated_delta_step",
    "ssm_scan_step",
    "selective_scan_step",
)

# Backends that register themselves on import of their module.
_BACKEND_MODULES = {"triton": "splitserve.kernels.triton_ops", "cpu": "splitserve.kernels.cpu_ops"}

# The reference of each op: kernels/reference.py, kernels/fp8_gemm.py for fp8
# weights, kernels/lora.py for batched LoRA and kernels/recurrent.py for the
# recurrent layers' steps.
_REFERENCE_MODULES = (reference, fp8_gemm, lora, recurrent)
_registry: dict[str, dict[str, Callable]] = {
    "reference": {name: next(getattr(m, name) for m in _REFERENCE_MODULES if hasattr(m, name))
                  for name in OP_NAMES}
}
_forced = threading.local()


class UnknownBackendError(ValueError):
    pass


def register(backend: str, name: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s implementation of op ``name``."""
    if name not in OP_NAMES:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(OP_NAMES)}")
    _registry.setdefault(backend, {})[name] = fn


def _load(backend: str) -> dict[str, Callable] | None:
    if backend not in _registry and backend in _BACKEND_MODULES:
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
        except ImportError:
            return None
    return _registry.get(backend)


def available_backends() -> list[str]:
    return [b for b in ("reference", *_BACKEND_MODULES) if _load(b) is not None]


def backend_for(device: torch.device) -> str:
    """The backend an op on ``device`` runs with, after overrides."""
    forced = getattr(_forced, "name", None) or os.environ.get("SPLITSERVE_KERNELS")
    if forced:
        if _load(forced) is None:
            raise UnknownBackendError(
                f"kernel backend {forced!r} is not available; available: {available_backends()}"
            )
        return forced
    if device.type == "cuda" and _load("triton") is not None:
        return "triton"
    if device.type == "cpu" and _load("cpu") is not None:
        return "cpu"
    return "reference"


def get_op(name: str, device: torch.device) -> Callable:
    table = _load(backend_for(device)) or _registry["reference"]
    # A backend may leave an op out; the reference is always complete.
    return table.get(name) or _registry["reference"][name]


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run the block with every op on backend ``name`` (this thread only)."""
    if _load(name) is None:
        raise UnknownBackendError(f"kernel backend {name!r} is not available")
    prev = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = prev
