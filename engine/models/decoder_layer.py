"""One decoder layer of the dense families: attention then an MLP (or a
mixture of experts), each behind a norm, the residual add fused into the
next norm. Built from ``splitserve.engine.models.layers``."""

from __future__ import annotations

import torch
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.layers import MLP, Attention, ShardSlot, model_norm, norm_slots
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.kernels.lora import LoraMeta


class DecoderLayer(nn.Module):
    """Attention then an MLP, each behind an RMSNorm. ``mlp`` replaces the
    dense MLP (mixture-of-experts layers); ``mlp_name`` is its name in
    checkpoints (Mixtral's is ``block_sparse_moe``). ``prefix``: the layer's
    name in checkpoints (``model.layers.3``), which says which of its
    tensors an fp8 checkpoint stores in fp8."""

    attention_class: type[Attention] = Attention  # families whose attention differs (Cohere) override it

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0, mlp: nn.Module | None = None, mlp_name: str = "mlp",
                 prefix: str = "", mixer: nn.Module | None = None, mixer_name: str = "self_attn"):
        """``mixer``: the token mixer in place of attention (a hybrid model's
        recurrent layers: Gated DeltaNet), named ``mixer_name`` in checkpoints."""
        super().__init__()
        self.input_layernorm = model_norm(cfg, cfg.hidden_size, dtype, device)
        self.mixer_name = mixer_name
        self.self_attn = (mixer if mixer is not None
                          else self.attention_class(cfg, dtype, device, sliding_window, prefix=f"{prefix}.self_attn"))
        self.post_attention_layernorm = model_norm(cfg, cfg.hidden_size, dtype, device)
        self.mlp = mlp if mlp is not None else MLP(cfg, dtype, device, prefix=f"{prefix}.{mlp_name}")
        self.mlp_name = mlp_name
        self.tp = None  # tensor parallel: the rank's TPGroup (splitserve.engine.parallel.group)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]: previous layer's output (the embeddings for layer 0)
        residual: torch.Tensor | None,  # [T, hidden] residual stream; None before layer 0
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor | None,
        lora: LoraMeta | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.attend(positions, x, residual, layer_cache, meta, cos_sin_cache, lora)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.feed_forward(h, lora), residual

    def attend(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
               layer_cache: torch.Tensor, meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None,
               lora: LoraMeta | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The input norm and attention: (attention output, residual stream).
        The residual add is fused into the next norm: a layer's output stays
        separate from the stream until the following rms_norm sums them."""
        if residual is None:
            residual = x
            h, _ = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, layer_cache, meta, cos_sin_cache, lora)
        if self.tp is not None:  # row-parallel o_proj: one all-reduce per attention block
            h = self.tp.all_reduce(h)
        return h, residual

    def feed_forward(self, h: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        """The MLP (or the experts) on normed ``h``, summed over TP ranks."""
        if lora is not None and self.mlp_takes_lora:  # MoE experts take no LoRA
            h = self.mlp(h, lora)
        else:
            h = self.mlp(h)
        if self.tp is not None:  # row-parallel down_proj (experts too): one per MLP block
            h = self.tp.all_reduce(h)
        return h

    @property
    def mlp_takes_lora(self) -> bool:
        """Whether the MLP is one that takes LoRA: the gated ``MLP`` (and its
        variants) or the ungated ``PlainMLP`` (``takes_lora``); not experts."""
        return isinstance(self.mlp, MLP) or getattr(self.mlp, "takes_lora", False)

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """LoRA stacks on the attention projections and, in a dense layer, the
        MLP's (the gated one's gate/up/down, the ungated one's up/down by
        their checkpoint names)."""
        out = self.self_attn.enable_lora(num_slots, max_rank)
        if type(self.mlp) is MLP or getattr(self.mlp, "takes_lora", False):
            out.update(self.mlp.enable_lora(num_slots, max_rank))
        return out

    def quantize_fp8_(self) -> None:
        """The attention and MLP projections to fp8, per output channel."""
        self.self_attn.quantize_fp8_()
        self.mlp.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        return {
            **norm_slots(f"{prefix}.input_layernorm", self.input_layernorm),
            **norm_slots(f"{prefix}.post_attention_layernorm", self.post_attention_layernorm),
            **self.self_attn.weight_slots(f"{prefix}.{self.mixer_name}"),
            **self.mlp.weight_slots(f"{prefix}.{self.mlp_name}"),
        }
