"""What the mixture-of-experts dialects (OLMoE, GraniteMoE) read alike."""

from __future__ import annotations

from typing import Any

# keys the Llama-style reading takes for sliding windows, dense layers among
# the sparse ones or Qwen2-MoE's shared expert, which these families'
# transformers code never reads
_LLAMA_ONLY_KEYS = ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers",
                    "decoder_sparse_step", "mlp_only_layers", "shared_expert_intermediate_size")


def without_window_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` less the keys of ``_LLAMA_ONLY_KEYS``: every layer attends to
    the whole context and holds the experts."""
    return {k: v for k, v in cfg.items() if k not in _LLAMA_ONLY_KEYS}


def checked_activation(cfg: dict[str, Any], family: str) -> str:
    """The experts' activation: SwiGLU (``silu``) is the one the fused
    expert kernels compute."""
    name = cfg.get("hidden_act") or "silu"
    if name not in ("silu", "swish"):
        raise ValueError(f"hidden_act {name!r} is not supported for {family}; supported: silu")
    return "silu"
