"""What the Mamba-2 hybrid dialects (Granite 4.0-H, Bamba) read alike: the
``mamba_*`` keys of their Mamba-2 layers and the per-layer kinds, as
transformers' ``GraniteMoeHybridConfig`` and ``BambaConfig`` read them."""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.hybrid_config import ATTENTION, HybridLayout
from splitserve.engine.mamba2_config import SSM_KIND, Mamba2Shape

# the mamba_* keys' defaults in both config classes (mamba_d_head "auto": the inner width
# mamba_expand * hidden_size split over the heads)
MAMBA_DEFAULTS = {"mamba_n_heads": 128, "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_head": "auto",
                  "mamba_d_conv": 4, "mamba_expand": 2, "mamba_conv_bias": True, "mamba_proj_bias": False}
# transformers' current and legacy layer type names
LAYER_KINDS = {"linear_attention": SSM_KIND, "mamba": SSM_KIND, "full_attention": ATTENTION,
               "attention": ATTENTION}


def json_float(value: Any) -> float:
    """A float as transformers writes it to config.json (infinities as
    ``{"__float__": "Infinity"}``)."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"].replace("Infinity", "inf"))
    return float(value)


def mamba2_shape(cfg: dict[str, Any], hidden: int, inner: int | None = None) -> Mamba2Shape:
    """The Mamba-2 layers' shape from the ``mamba_*`` keys and ``time_step_limit``;
    ``inner``: the inner width where the family sets it (Falcon-H1's
    ``mamba_d_ssm``), else ``mamba_expand`` x hidden_size."""
    m = {**MAMBA_DEFAULTS, **{k: v for k, v in cfg.items() if k in MAMBA_DEFAULTS and v is not None}}
    heads = int(m["mamba_n_heads"])
    inner = int(m["mamba_expand"]) * hidden if inner is None else inner
    head_dim = inner // heads if m["mamba_d_head"] == "auto" else int(m["mamba_d_head"])
    if heads * head_dim != inner:
        raise ValueError(f"mamba_n_heads {heads} x mamba_d_head {head_dim} must equal the inner width "
                         f"(mamba_expand x hidden_size or mamba_d_ssm: {inner})")
    limit = cfg.get("time_step_limit")
    limit = (0.0, math.inf) if limit is None else tuple(json_float(v) for v in limit)
    if len(limit) != 2:
        raise ValueError(f"time_step_limit must be (low, high), got {cfg.get('time_step_limit')!r}")
    return Mamba2Shape(num_heads=heads, head_dim=head_dim, n_groups=int(m["mamba_n_groups"]),
                       state_size=int(m["mamba_d_state"]), conv_kernel=int(m["mamba_d_conv"]),
                       conv_bias=bool(m["mamba_conv_bias"]), proj_bias=bool(m["mamba_proj_bias"]),
                       time_step_limit=limit)


def checked_kinds(types: list[Any], num_layers: int, key: str) -> tuple[str, ...]:
    """Per layer ``ATTENTION`` or ``SSM_KIND`` from a list of layer type names."""
    if len(types) != num_layers:
        raise ValueError(f"{key} has {len(types)} entries for {num_layers} layers")
    unknown = sorted({str(t) for t in types if t not in LAYER_KINDS})
    if unknown:
        raise ValueError(f"{key} {unknown} are not supported; supported: {', '.join(LAYER_KINDS)}")
    kinds = tuple(LAYER_KINDS[t] for t in types)
    if ATTENTION not in kinds:
        raise ValueError(f"{key} has no attention layer; a model of Mamba-2 layers only is not supported")
    return kinds


def hybrid_layout(kinds: tuple[str, ...], shape: Mamba2Shape) -> HybridLayout:
    return HybridLayout(kinds, shape.states())
