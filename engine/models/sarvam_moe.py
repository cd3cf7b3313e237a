"""Sarvam MoE and Param2 MoE (``SarvamMoEForCausalLM``,
``Param2MoEForCausalLM``): GLM-4.5's mixture-of-experts decoder
(``Glm4MoeCausalLM``) under the original checkpoints' tensor names, as
transformers' ``sarvam_moe`` / ``param2moe`` weight conversions read them.

What this class adds: the names mapped at load (``model.word_embeddings``
-> ``model.embed_tokens``, ``attention.dense`` -> ``self_attn.o_proj``,
``attention.query_layernorm`` / ``key_layernorm`` -> ``self_attn.q_norm`` /
``k_norm``, ``mlp.gate.expert_bias`` -> ``mlp.gate.e_score_correction_bias``)
and the fused ``attention.query_key_value`` (weight and bias: all query rows,
then the keys', then the values') split into q/k/v_proj. LoRA adapters are
refused (PEFT would train the fused tensor)."""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.glm4_moe import Glm4MoeCausalLM
from splitserve.engine.models.mapped import MappedCausalLM, renamed

_PREFIXES = (("model.word_embeddings.", "model.embed_tokens."),)
_PARTS = ((".attention.dense.", ".self_attn.o_proj."),
          (".attention.query_layernorm.", ".self_attn.q_norm."),
          (".attention.key_layernorm.", ".self_attn.k_norm."),
          (".attention.", ".self_attn."),
          (".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"))


class SarvamMoeCausalLM(MappedCausalLM, Glm4MoeCausalLM):
    lora_refusal = ("LoRA adapters are not supported for Sarvam MoE / Param2 MoE checkpoints (PEFT "
                    "trains their fused attention.query_key_value, which is split at load)")

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        name = renamed(name, _PREFIXES, _PARTS, count=1)
        if ".self_attn.query_key_value." not in name:
            yield name, tensor
            return
        cfg = self.cfg if self.tp is None else self.tp.plan.cfg  # the whole model's sizes
        sizes = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
        if tensor.dim() < 1 or tensor.shape[0] != sum(sizes):
            raise CheckpointError(f"tensor {name!r}: expected {sum(sizes)} rows ({cfg.num_heads} query and "
                                  f"{cfg.num_kv_heads} key/value heads of {cfg.head_dim}), got shape "
                                  f"{list(tensor.shape)}")
        base, _, kind = name.rpartition(".")
        base = base.rpartition(".")[0]
        for part, t in zip(("q_proj", "k_proj", "v_proj"), torch.split(tensor, sizes)):
            yield f"{base}.{part}.{kind}", t
