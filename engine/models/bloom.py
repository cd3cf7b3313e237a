"""Bloom (``BloomForCausalLM``): the dense decoder with LayerNorm, the
ungated tanh-GELU MLP and ALiBi in place of RoPE (``FamilyOptions``, from
``splitserve.engine.dialects.bloom``), one KV head per query head, and a
LayerNorm on the token embeddings before the first layer.

Its checkpoints use the names Falcon inherited from it, mapped as
``FalconCausalLM`` maps them (``transformer.word_embeddings`` ->
``model.embed_tokens``, ``transformer.h.N`` -> ``model.layers.N``,
``self_attention`` -> ``self_attn``, its ``dense`` -> ``o_proj``,
``transformer.ln_f`` -> ``model.norm``; the MLP keeps ``dense_h_to_4h`` /
``dense_4h_to_h``), and its fused ``query_key_value`` holds each head's q,
k and v rows together ([head 0: q | k | v, head 1: ...]), Falcon's layout
without grouped heads: Falcon's split covers it. The embeddings' norm,
``transformer.word_embeddings_layernorm``, loads as ``model.embed_layernorm``.

With ``apply_residual_connection_post_layernorm`` each block adds its
output to its normed input, not to its input (``NormedResidualLayer``).
Exports of the bare ``BloomModel`` carry the same names without
``transformer.``. The LM head is tied to the token embeddings unless
config.json says otherwise.
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.falcon import FalconCausalLM
from splitserve.engine.models.layers import ShardSlot, model_norm, norm_slots
from splitserve.engine.models.plain_blocks import PlainMLP
from splitserve.kernels.lora import LoraMeta

_EMBED_NORM = "model.embed_layernorm"
_BARE = ("word_embeddings.", "word_embeddings_layernorm.", "h.", "ln_f.")  # BloomModel's names


class NormedResidualLayer(DecoderLayer):
    """Bloom's block with ``apply_residual_connection_post_layernorm``:
    ``h = ln1(x); a = h + attn(h); y = ln2(a); out = y + mlp(y)``. Its
    output is the whole stream, so it returns no separate residual (and
    takes none: the previous layer returned None too). At tensor
    parallelism the attention's partial sums are reduced before they join
    ``h`` (the MLP's in ``feed_forward``)."""

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,  # always None
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor | None,
        lora: LoraMeta | None = None,
    ) -> tuple[torch.Tensor, None]:
        h, _ = self.input_layernorm(x)
        attn = self.self_attn(positions, h, layer_cache, meta, cos_sin_cache, lora)
        a = h + (attn if self.tp is None else self.tp.all_reduce(attn))
        h, _ = self.post_attention_layernorm(a)
        return h + self.feed_forward(h, lora), None


class BloomCausalLM(FalconCausalLM):
    """Bloom: Falcon's checkpoint names and q/k/v split, a norm on the embeddings."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self.embed_layernorm = model_norm(cfg, cfg.hidden_size, dtype, device)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        if not self.cfg.options.residual_after_norm:
            return super().build_layer(index, window, dtype, device)
        prefix = f"model.layers.{index}"
        mlp = PlainMLP(self.cfg, dtype, device, prefix=f"{prefix}.mlp")
        return NormedResidualLayer(self.cfg, dtype, device, window, mlp=mlp, prefix=prefix)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings through ``word_embeddings_layernorm``."""
        return self.embed_layernorm(super().embed(input_ids))[0]

    def weight_slots(self) -> dict[str, ShardSlot]:
        return {**super().weight_slots(), **norm_slots(_EMBED_NORM, self.embed_layernorm)}

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.startswith(_BARE):  # an export of the bare BloomModel
            name = f"transformer.{name}"
        if name.startswith("transformer.word_embeddings_layernorm."):
            yield f"{_EMBED_NORM}.{name.rpartition('.')[2]}", tensor
        else:
            yield from super().mapped(name, tensor)
