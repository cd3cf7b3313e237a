"""Model families by name; ``build_model`` picks the implementation for a config."""

from __future__ import annotations

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.moe import MoECausalLM

# family -> implementation; the dense families share one decoder with flags,
# the mixture-of-experts ones add sparse MLP layers to it.
MODEL_FAMILIES: dict[str, type[CausalLM]] = {
    "llama": CausalLM,
    "mistral": CausalLM,
    "qwen2": CausalLM,
    "qwen3": CausalLM,
    "mixtral": MoECausalLM,
    "qwen2_moe": MoECausalLM,
    "qwen3_moe": MoECausalLM,
}


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """An unloaded model (parameters allocated, not initialised) for ``cfg``."""
    impl = MODEL_FAMILIES.get(cfg.family)
    if impl is None:
        raise CheckpointError(
            f"model family {cfg.family!r} ({cfg.architecture}) has no implementation; "
            f"supported: {', '.join(MODEL_FAMILIES)}"
        )
    return impl(cfg, dtype, torch.device(device)).eval()


__all__ = ["CausalLM", "MODEL_FAMILIES", "MoECausalLM", "build_model"]
