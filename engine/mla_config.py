"""The shape of multi-head latent attention (DeepSeek V2 / V3), as config.json
gives it (``FamilyOptions.mla``; ``splitserve.engine.models.mla`` runs it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MLAConfig:
    """transformers' ``DeepseekV2Attention`` / ``DeepseekV3Attention``, per token:

    - q = q_b_proj(q_a_layernorm(q_a_proj(x))), or q_proj(x) when ``q_lora_rank``
      is 0 (config.json: null); each head's q is [nope | rope] dims;
    - kv_a_proj_with_mqa(x) = [latent (``kv_lora_rank``) | k_pe (``qk_rope_head_dim``,
      one for all heads)]; kv_b_proj(kv_a_layernorm(latent)) gives each head
      [k_nope (``qk_nope_head_dim``) | v (``v_head_dim``)];
    - k = [k_nope | rope(k_pe)], q = [q_nope | rope(q_pe)] per head.
    """

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_head_dim(self) -> int:
        """The paged cache's one KV head width: the latent and the rotated
        k_pe, ``kv_lora_rank + qk_rope_head_dim`` (576 for DeepSeek-V3),
        which every query head attends to (``splitserve.engine.models.mla``)."""
        return self.kv_lora_rank + self.qk_rope_head_dim
