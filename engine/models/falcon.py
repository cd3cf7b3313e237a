"""Falcon: the dense decoder with LayerNorm, the ungated GELU MLP, full-head
RoPE (ALiBi with ``alibi: true``) and, by default, the parallel residual
(``FamilyOptions`` from ``splitserve.engine.dialects.falcon``), multi-query
or grouped KV heads.

Its checkpoints name things their own way; ``FalconCausalLM`` renames them
at load onto the shared decoder's slots: ``transformer.word_embeddings`` ->
``model.embed_tokens``, ``transformer.h.N`` -> ``model.layers.N``,
``self_attention`` -> ``self_attn`` (``dense`` -> ``o_proj``),
``ln_attn`` / ``ln_mlp`` (the new architecture's two norms) ->
``input_layernorm`` / ``post_attention_layernorm`` (the parallel layer's
MLP norm), ``transformer.ln_f`` -> ``model.norm``; the MLP keeps
``dense_h_to_4h`` / ``dense_4h_to_h``.

The fused ``query_key_value`` is split into q/k/v_proj in the layout
transformers' ``FalconAttention`` reads it:

- new architecture: one group per KV head, each its query heads then its
  key and its value ([g0: q.. | k | v, g1: ...]);
- multi-query: every query head, then the one key and the one value;
- otherwise q, k and v per head ([h0: q | k | v, h1: ...]).

The last two are the first with one group, or with one query head per
group: one split covers all three.

LoRA adapters on ``query_key_value``, ``dense`` and the MLP are served,
``query_key_value``'s lora_B rows split as the weight's
(``splitserve.engine.lora.mapped_layout``).
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.mapped import MappedCausalLM, renamed

_RENAMES = (  # checkpoint prefix -> the shared decoder's (first match wins)
    ("transformer.word_embeddings.", "model.embed_tokens."),
    ("transformer.ln_f.", "model.norm."),
    ("transformer.h.", "model.layers."),
)
_LAYER_RENAMES = ((".self_attention.dense.", ".self_attn.o_proj."), (".self_attention.", ".self_attn."),
                  (".ln_attn.", ".input_layernorm."), (".ln_mlp.", ".post_attention_layernorm."))


class FalconCausalLM(MappedCausalLM):
    """Falcon (``FalconForCausalLM``): checkpoint names mapped, q/k/v split at load."""

    def split_qkv(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """``query_key_value.{weight,bias}`` -> q_proj, k_proj and v_proj's, whole
        (tensor parallel: the full model's heads; each rank's slots then
        take their part)."""
        cfg = self.cfg if self.tp is None else self.tp.plan.cfg
        heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rows = (heads + 2 * kv) * d
        if tensor.dim() < 1 or tensor.shape[0] != rows:
            raise CheckpointError(f"tensor {name!r}: expected {rows} rows ({heads} query and "
                                  f"{kv} key/value heads of {d}), got shape {list(tensor.shape)}")
        rest = tensor.shape[1:]
        groups = tensor.reshape(kv, heads // kv + 2, d, *rest)  # per KV head: its queries, k, v
        q, k, v = groups[:, :-2], groups[:, -2], groups[:, -1]
        base, _, kind = name.rpartition(".")  # kind: weight | bias
        base = base.rpartition(".")[0]
        for part, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            yield f"{base}.{part}.{kind}", t.reshape(-1, *rest)

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        name = renamed(name, _RENAMES, _LAYER_RENAMES)
        if ".self_attn.query_key_value." in name:
            yield from self.split_qkv(name, tensor)
        else:
            yield name, tensor
