"""An adapter's tensors in host memory, ready to copy into a device slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open

from splitserve.engine.config import ModelConfig
from splitserve.engine.lora.adapter import (AdapterError, AdapterRef, AdapterUnavailableError,
                                            adapter_files, file_digest)
from splitserve.engine.lora.layout import read_layout


@dataclass(frozen=True)
class AdapterWeights:
    """(layer, projection) -> (A [r, in], B [out, r] times the module's
    scaling), in the model's dtype on the host."""

    ref: AdapterRef
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def load_adapter(ref: AdapterRef, model: ModelConfig, max_rank: int,
                 dtype: torch.dtype) -> AdapterWeights:
    """Read ``ref``'s files. Raises AdapterUnavailableError when they are not
    at ``ref.path`` on this node or are no longer the files of ``ref.digest``,
    AdapterError when they do not fit the model. Thread-safe: touches no
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
            a = f.get_tensor(m.a_name).to(dtype)
            # scaling folded into B in float32, rounded once to the model's dtype
            b = f.get_tensor(m.b_name)
            first, rows = m.b_rows
            if rows:  # one part of a fused projection's lora_B (its A is shared), in each period
                b = b.reshape(-1, m.b_period or b.shape[0], b.shape[-1])[:, first:first + rows].flatten(0, 1)
            b = (b.float() * m.scaling).to(dtype)
            modules[key] = (a.contiguous(), b.contiguous())
    return AdapterWeights(ref, modules)
