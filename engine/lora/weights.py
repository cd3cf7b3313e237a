"""An adapter's tensors in host memory, ready to copy into a device slot,
each checked as it is read: floating point and finite."""

from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from splitserve.engine.config import ModelConfig
from splitserve.engine.lora.adapter import (AdapterError, AdapterRef, AdapterUnavailableError,
                                            adapter_files, file_digest)
from splitserve.engine.lora.layout import read_layout

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # as the safetensors header names them


@dataclass(frozen=True)
class AdapterWeights:
    """(layer, projection) -> (A [r, in], B [out, r] times the module's
    scaling), in the model's dtype on the host."""

    ref: AdapterRef
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def checked_tensor(f, name: str, source: str) -> torch.Tensor:
    """Tensor ``name`` of the open safetensors file ``f``, refused with an
    AdapterError naming it (param ``lora_path``) unless it is floating point
    and finite: an integer or boolean tensor would be cast to meaningless
    weights, and a NaN or infinity would reach every output of a request
    using the adapter. The dtype is read from the header, before the data."""
    dtype = f.get_slice(name).get_dtype()
    if dtype not in _FLOAT_DTYPES:
        raise AdapterError(f"{source}: tensor {name[:200]!r} is {dtype}; adapter weights must be "
                           f"floating point ({', '.join(_FLOAT_DTYPES)})", param="lora_path")
    t = f.get_tensor(name)
    # NaN propagates to the min and max, an infinity is one of them: a
    # quarter of isfinite's time on a large tensor
    if t.numel() and not all(torch.isfinite(v) for v in torch.aminmax(t)):
        raise AdapterError(f"{source}: tensor {name[:200]!r} holds NaN or infinite values",
                           param="lora_path")
    return t


def check_adapter_values(path: str | Path) -> None:
    """Every tensor of the PEFT folder ``path`` checked (``checked_tensor``),
    when an adapter is registered: each is read once (an adapter's
    megabytes take milliseconds)."""
    _, weights = adapter_files(path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():
                checked_tensor(f, name, str(weights))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: not a readable safetensors file: {e}",
                           param="lora_path") from None


def load_adapter(ref: AdapterRef, model: ModelConfig, max_rank: int,
                 dtype: torch.dtype) -> AdapterWeights:
    """Read ``ref``'s files. Raises AdapterUnavailableError when they are not
    at ``ref.path`` on this node or are no longer the files of ``ref.digest``,
    AdapterError when they do not fit the model or a tensor is not floating
    point and finite (``checked_tensor``). Thread-safe: touches no
    engine state (callers run it off the engine thread)."""
    try:
        digest = file_digest(ref.path)
    except AdapterError as e:
        raise AdapterUnavailableError(f"adapter {ref.name!r}: {e}") from None
    if digest != ref.digest:
        raise AdapterUnavailableError(
            f"adapter {ref.name!r}: the files at {ref.path} changed since it was registered "
            f"(digest {digest[:12]}, expected {ref.digest[:12]}); load it again under a name")
    layout = read_layout(ref.path, model, max_rank)
    _, path = adapter_files(ref.path)
    modules = {}
    with safe_open(str(path), framework="pt") as f:
        for key, m in layout.modules.items():
            a = checked_tensor(f, m.a_name, str(path)).to(dtype)
            # scaling folded into B in float32, rounded once to the model's dtype
            b = checked_tensor(f, m.b_name, str(path))
            first, rows = m.b_rows
            if rows:  # one part of a fused projection's lora_B (its A is shared), in each period
                b = b.reshape(-1, m.b_period or b.shape[0], b.shape[-1])[:, first:first + rows].flatten(0, 1)
            b = (b.float() * m.scaling).to(dtype)
            modules[key] = (a.contiguous(), b.contiguous())
    return AdapterWeights(ref, modules)
