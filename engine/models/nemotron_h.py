"""Nemotron-H (``NemotronHForCausalLM``): Mamba-2 blocks
(``splitserve.engine.models.mamba2``) and attention blocks without
positional encoding, each here one decoder layer with the relu2 MLP block
or MoE block (``splitserve.engine.models.nemotron_h_moe``) that follows it
in the checkpoint, if any (``FamilyOptions.checkpoint_blocks``).

A checkpoint block is ``x + mixer(norm(x))``, so a mixer block then an MLP
block is the decoder's ``x + attn(norm1(x))`` then ``+ mlp(norm2(.))``;
a layer without an MLP block returns after its mixer. Checkpoint names map
onto the decoder's in ``weight_slots``: ``backbone.embeddings`` is the
token embedding, ``backbone.layers.j.norm`` / ``.mixer`` the norm and the
mixer (or MLP) of block j, ``backbone.norm_f`` the final norm.

LoRA adapters apply to the attention blocks' projections, the Mamba-2
blocks' ``in_proj`` and the MLP blocks' ``up_proj`` / ``down_proj``;
``splitserve.engine.lora.hybrid_layout`` maps PEFT's block numbers onto the
decoder layers and refuses the MoE blocks.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.layers import ShardSlot, norm_slots
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.mamba2 import Mamba2Mixer
from splitserve.engine.models.nemotron_h_moe import NemotronHMoE
from splitserve.engine.models.plain_blocks import PlainMLP
from splitserve.kernels.lora import LoraMeta

_LAYER = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|mixer|mlp)\.(.+)")


class NemotronHDecoderLayer(DecoderLayer):
    """A Mamba-2 or attention block (named ``mixer``), then the MLP or MoE
    block ``mlp``; without one, no post-attention norm or MLP."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, prefix: str,
                 mixer: Mamba2Mixer | None, mlp: nn.Module | None):
        super().__init__(cfg, dtype, device, 0, mlp=mlp or nn.Identity(), prefix=prefix, mixer=mixer,
                         mixer_name="mixer")
        if mlp is None:
            self.mlp = self.post_attention_layernorm = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                layer_cache: torch.Tensor, meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None,
                lora: LoraMeta | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mlp is None:  # the next norm adds the mixer's output to the stream
            return self.attend(positions, x, residual, layer_cache, meta, cos_sin_cache, lora)
        return super().forward(positions, x, residual, layer_cache, meta, cos_sin_cache, lora)

    def feed_forward(self, h: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        """The MLP block with each token's adapter's delta (tensor parallelism
        is refused), or the MoE block (no LoRA)."""
        if isinstance(self.mlp, PlainMLP):
            return self.mlp(h, lora)
        return super().feed_forward(h, lora)

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """LoRA stacks on the attention or Mamba-2 block and on an MLP block."""
        out = self.self_attn.enable_lora(num_slots, max_rank)
        if isinstance(self.mlp, PlainMLP):
            out.update(self.mlp.enable_lora(num_slots, max_rank))
        return out

    def quantize_fp8_(self) -> None:
        self.self_attn.quantize_fp8_()
        if self.mlp is not None:
            self.mlp.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        if self.mlp is not None:
            return super().weight_slots(prefix)
        return {**norm_slots(f"{prefix}.input_layernorm", self.input_layernorm),
                **self.self_attn.weight_slots(f"{prefix}.mixer")}


class NemotronHCausalLM(HybridCausalLM):
    takes_lora = True  # checked against PEFT (tests/unit/test_lora_engine.py)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg = self.cfg
        layout = cfg.options.hybrid
        mixer = (None if layout.layer_kinds[index] == ATTENTION
                 else Mamba2Mixer(cfg, dtype, device, layout.state_index(index)))
        if mixer is not None:
            mixer.lora_projections = ("in_proj",)  # out_proj takes none (as PEFT refuses it)
        prefix = f"model.layers.{index}"
        mlp = None
        if cfg.moe is not None and cfg.moe.sparse_layers[index]:
            mlp = NemotronHMoE(cfg, dtype, device, prefix=f"{prefix}.mlp")
        elif cfg.options.checkpoint_blocks[index][1] >= 0:
            mlp = PlainMLP(cfg, dtype, device, prefix=f"{prefix}.mlp")
        return NemotronHDecoderLayer(cfg, dtype, device, prefix, mixer, mlp)

    def rope_table(self, index: int) -> torch.Tensor | None:
        return None  # no positional encoding

    def weight_slots(self) -> dict[str, ShardSlot]:
        """The decoder's slots by the checkpoint's block names."""
        blocks = self.cfg.options.checkpoint_blocks
        out: dict[str, ShardSlot] = {}
        for name, slot in super().weight_slots().items():
            m = _LAYER.fullmatch(name)
            if name == "model.embed_tokens.weight":
                name = "backbone.embeddings.weight"
            elif m is not None:
                mixer, mlp = blocks[int(m[1])]
                block = mixer if m[2] in ("input_layernorm", "mixer") else mlp
                part = "norm" if m[2].endswith("layernorm") else "mixer"
                name = f"backbone.layers.{block}.{part}.{m[3]}"
            out[name] = slot
        return out

    def _skipped(self, name: str) -> bool:
        return name.startswith("mtp.") or super()._skipped(name)  # multi-token prediction, unused
