"""Liquid LFM2 (``Lfm2ForCausalLM``): a hybrid of gated short-convolution
layers (``splitserve.engine.models.short_conv``, a state per sequence) and
Llama attention layers (per-head q/k RMSNorms), each followed by a SwiGLU
MLP; the base of LFM2-MoE and LFM3 (``splitserve.engine.models.lfm2_moe``,
``lfm3``).

Its checkpoints name things their own way; they are renamed at load onto
the shared decoder's slots: ``operator_norm`` -> ``input_layernorm``,
``ffn_norm`` -> ``post_attention_layernorm``, ``feed_forward.w1/w3/w2`` ->
``mlp.gate_proj/up_proj/down_proj``, ``self_attn.out_proj`` -> ``o_proj``,
``q_layernorm`` / ``k_layernorm`` -> ``q_norm`` / ``k_norm``,
``model.embedding_norm`` (the norm after the last layer) -> ``model.norm``.
The convolution layers keep theirs (``conv.in_proj``, ``conv.conv``,
``conv.out_proj``). A config whose every layer attends (``Lfm2Config``'s
default) runs as the plain decoder, with no state.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.mapped import MappedCausalLM, renamed
from splitserve.engine.models.short_conv import ShortConv
from splitserve.kernels.lora import LoraMeta

PREFIXES = (("model.embedding_norm.", "model.norm."),)
NORMS_AND_ATTENTION = ((".operator_norm.", ".input_layernorm."), (".self_attn.out_proj.", ".self_attn.o_proj."),
                       (".self_attn.q_layernorm.", ".self_attn.q_norm."),
                       (".self_attn.k_layernorm.", ".self_attn.k_norm."))
DENSE_MLP = ((".feed_forward.w1.", ".mlp.gate_proj."), (".feed_forward.w3.", ".mlp.up_proj."),
             (".feed_forward.w2.", ".mlp.down_proj."))
_RENAMES = (*NORMS_AND_ATTENTION, (".ffn_norm.", ".post_attention_layernorm."), *DENSE_MLP)


class Lfm2ForCausalLM(HybridCausalLM, MappedCausalLM):
    """``layer_class``: the decoder layer (LFM3's has sandwich norms);
    ``renames``: the checkpoint's layer names -> the shared decoder's."""

    layer_class: type[DecoderLayer] = DecoderLayer
    renames: tuple[tuple[str, str], ...] = _RENAMES

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return self.layer_class(self.cfg, dtype, device, window, prefix=f"model.layers.{index}",
                                **self.mixer(index, dtype, device), **self.feed_forward(index, dtype, device))

    def mixer(self, index: int, dtype: torch.dtype, device: torch.device | str) -> dict:
        """Layer ``index``'s token mixer as ``DecoderLayer`` takes it: a short
        convolution on the recurrent layers, attention (none given) on the others."""
        layout = self.cfg.options.hybrid
        if layout is None or layout.layer_kinds[index] == ATTENTION:
            return {}
        return {"mixer": ShortConv(self.cfg, dtype, device, layout.state_index(index)), "mixer_name": "conv"}

    def feed_forward(self, index: int, dtype: torch.dtype, device: torch.device | str) -> dict:
        """Layer ``index``'s MLP as ``DecoderLayer`` takes it (none: the dense one)."""
        return {}

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield renamed(name, PREFIXES, self.renames), tensor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, on_layer_done: Callable[[int], None] | None = None,
                lora: LoraMeta | None = None) -> torch.Tensor:
        if self.cfg.options.hybrid is None:  # every layer attends
            return CausalLM.forward(self, input_ids, positions, kv_cache, meta, on_layer_done, lora)
        return super().forward(input_ids, positions, kv_cache, meta, on_layer_done, lora)
