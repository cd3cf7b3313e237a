"""GLM-4 (``Glm4ForCausalLM``, GLM-4-9B-0414 and kin): its config.json in
Llama's keys, and its ``FamilyOptions``.

transformers' Glm4Config has GLM's keys and defaults (``partial_rotary_factor``
0.5, rotated in adjacent pairs; ``attention_bias`` on q/k/v only; head_dim
128, 2 KV heads, eps 1.5625e-7, untied embeddings), so its config.json is
read as GLM's (``splitserve.engine.dialects.glm``). What GLM-4 adds, a norm
on each block's output, is in ``splitserve.engine.models.glm4``. fp8
checkpoints are refused as GLM's are.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.glm import llama_keys, rotary_dim
from splitserve.engine.family_config import FamilyOptions, family_activation


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "Glm4ForCausalLM", "fused gate_up_proj, q/k rows reordered at load")
    return FamilyOptions(hidden_act=family_activation(cfg, "glm4"), interleaved_rope=True,
                         rotary_dim=rotary_dim(cfg))


DIALECT = Dialect(architectures=("Glm4ForCausalLM",), llama_keys=llama_keys, options=options)
