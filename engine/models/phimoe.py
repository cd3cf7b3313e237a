"""PhiMoE (Phi-3.5-MoE): the mixture-of-experts decoder of
``splitserve.engine.models.moe`` with LayerNorms, biased attention and
LM head (``FamilyOptions``), the sparsemixer router (``MoEConfig``) and
PhiMoE's own reading of LongRoPE, built here.

transformers' PhimoeRotaryEmbedding recomputes its frequencies on every
call with no sequence length, so they are always LongRoPE's short ones;
what changes past ``original_max_position_embeddings`` is the cos/sin
amplitude, ``long_mscale`` instead of ``short_mscale`` (picked from the
longest position of the call, as Phi-3's factors are: the table here
switches at that position, exactly transformers' as long as no single
prefill crosses it, see ``splitserve.engine.models.longrope``). Without
rope scaling the table is the default one. Tensor names are Mixtral's and
Llama's, so checkpoints load as they are and split across tensor-parallel
ranks as Mixtral's do (its LayerNorms whole on every rank, its LM head's
bias by vocabulary rows).
"""

from __future__ import annotations

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.longrope import longrope_inv_freq, longrope_params
from splitserve.engine.models.moe import MoECausalLM
from splitserve.engine.models.rope import rope_type


def phimoe_rope_table(cfg: ModelConfig) -> torch.Tensor:
    """[max_position, head_dim] float32 cos | sin: short LongRoPE frequencies,
    scaled by short_mscale below the original length and long_mscale from it on."""
    scaling = cfg.rope_scaling
    short, _, original, _ = longrope_params(scaling, cfg.head_dim, cfg.max_position, 0)
    positions = torch.arange(cfg.max_position, dtype=torch.float)
    freqs = positions[:, None] * longrope_inv_freq(cfg.rope_theta, cfg.head_dim, short)[None, :]
    mscale = torch.where(positions < original, float(scaling["short_mscale"]),
                         float(scaling["long_mscale"]))[:, None]
    return torch.cat([freqs.cos() * mscale, freqs.sin() * mscale], dim=-1)


class PhimoeCausalLM(MoECausalLM):
    """PhiMoE (``PhimoeForCausalLM``): ``MoECausalLM`` with PhiMoE's LongRoPE table."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        if rope_type(cfg.rope_scaling) == "longrope":
            self.cos_sin_cache = phimoe_rope_table(cfg).to(device)
