"""MiniCPM5-MoE (``MiniCPM5MoeForCausalLM``): the mixture-of-experts decoder
of ``splitserve.engine.models.moe`` (DeepSeek-V3's grouped sigmoid router,
ungated shared experts, dense layers by ``mlp_layer_types``) with gated
attention.

transformers' ``MiniCPM5MoeAttention`` projects each head's query and gate
in one ``q_gate_proj`` (stored as ``self_attn.q_proj``, renamed at load):
rows [query (head_dim) | gate (head_dim)] per head. Its attention is
Llama's (grouped KV heads, RoPE over every dim); the heads' output is
multiplied by ``sigmoid(gate)`` before ``o_proj``. Here the rows split at
load: the queries into ``qkv_proj`` with k and v, the gates into their own
projection (``gate_proj``, with its bias under ``attention_bias``).

LoRA adapters are refused: q_proj holds the gate's rows, which adapters for
the shared decoder's q_proj do not expect. (``splitserve.engine.dialects.
minicpm5_moe`` reads config.json.)
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gated_attention import GatedAttention
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.moe import MoECausalLM

_FUSED = (".self_attn.q_proj.", ".self_attn.q_gate_proj.")  # the released name, transformers'


class GatedAttentionLayer(DecoderLayer):
    attention_class = GatedAttention


class MiniCPM5MoeCausalLM(MoECausalLM):
    """MiniCPM5-MoE: ``GatedAttention`` in every layer, q_proj split at load."""

    layer_class = GatedAttentionLayer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split(weights))

    def _split(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each fused q_proj's per-head [query | gate] rows as ``q_proj`` and ``gate_proj``."""
        h, d = self.cfg.num_heads, self.cfg.head_dim
        for name, tensor in weights:
            fused = next((f for f in _FUSED if f in name), None)
            if fused is None:
                yield name, tensor
                continue
            if tensor.shape[0] != 2 * h * d:
                raise CheckpointError(f"tensor {name!r} has {tensor.shape[0]} rows; {self.cfg.architecture} "
                                      f"needs {2 * h * d} (a query and a gate of {d} per head for {h} heads)")
            pairs = tensor.reshape(h, 2, d, *tensor.shape[1:])
            prefix, suffix = name.split(fused)
            yield f"{prefix}.self_attn.q_proj.{suffix}", pairs[:, 0].reshape(h * d, *tensor.shape[1:])
            yield f"{prefix}.self_attn.gate_proj.{suffix}", pairs[:, 1].reshape(h * d, *tensor.shape[1:])

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError(f"LoRA adapters are not supported for {self.cfg.architecture} checkpoints "
                              "(q_proj holds each head's query and output gate; its experts take none)")
