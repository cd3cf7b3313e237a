"""The attention shape of MiMo-V2-Flash, as its config.json gives it
(``FamilyOptions.mimo_v2``; ``splitserve.engine.models.mimo_v2_flash`` runs it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MiMoV2Shape:
    """``kv_heads``: the full-attention layers' KV heads (``num_key_value_heads``;
    the sliding layers have twice as many); ``v_head_dim``: the values' head width
    (the queries' and keys' is ``ModelConfig.head_dim``); ``value_scale``: the
    values' multiplier (``attention_value_scale``)."""

    kv_heads: int
    v_head_dim: int
    value_scale: float
