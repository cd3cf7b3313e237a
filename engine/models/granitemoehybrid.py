"""Granite 4.0-H (``GraniteMoeHybridForCausalLM``): Mamba-2 layers
(``splitserve.engine.models.mamba2``, checkpoint name ``mamba``) beside
Granite attention layers, every layer followed by GraniteMoeShared's MLP:
the experts plus a dense ``shared_mlp`` (or, without experts, the
``shared_mlp`` alone). Granite's four scalars apply throughout: embeddings,
attention scores, each mixer's and MLP's output before the residual add,
the logits (``splitserve.engine.models.granite``). Attention applies RoPE
only with ``position_embedding_type`` "rope" (``FamilyOptions.nope_layers``
lists every layer otherwise).

LoRA adapters apply to attention, the Mamba-2 mixers' ``in_proj`` /
``out_proj`` and ``shared_mlp`` (its fused ``input_linear`` as the gate and
up parts), not to the experts (``splitserve.engine.lora.hybrid_layout``).

Fused expert and shared MLP tensors are split at load as GraniteMoE's
(``splitserve.engine.models.granitemoe``).
"""

from __future__ import annotations

import torch

from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.granite import GraniteDecoderLayer
from splitserve.engine.models.granitemoe import GraniteMoeCausalLM, GraniteMoeDecoderLayer
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.layers import MLP
from splitserve.engine.models.mamba2 import Mamba2Mixer
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.kernels.lora import LoraMeta

_MOE, _SHARED = "block_sparse_moe", "shared_mlp"


class GraniteMoeHybridDecoderLayer(GraniteMoeDecoderLayer):
    """A Mamba-2 or attention layer with the experts and ``shared_mlp`` (its
    feed-forward, fp8 and checkpoint names as GraniteMoeShared's), or with the
    dense ``shared_mlp`` alone when the model has no experts."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, prefix: str,
                 mixer: Mamba2Mixer | None):
        experts = cfg.moe is not None
        name = _MOE if experts else _SHARED
        mlp = (SparseMoeBlock(cfg, dtype, device, prefix=f"{prefix}.{name}") if experts
               else MLP(cfg, dtype, device, prefix=f"{prefix}.{name}"))
        kwargs = {} if mixer is None else {"mixer": mixer, "mixer_name": "mamba"}
        # GraniteMoeDecoderLayer's own __init__ always builds experts: skipped
        GraniteDecoderLayer.__init__(self, cfg, dtype, device, 0, prefix=prefix, mlp=mlp, mlp_name=name,
                                     **kwargs)
        self.shared_mlp = MLP(cfg, dtype, device, prefix=f"{prefix}.{_SHARED}") if experts else None

    def feed_forward(self, h: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        """The experts (no LoRA) plus ``shared_mlp`` with each token's adapter's
        delta; without experts, ``shared_mlp`` alone as the decoder's MLP."""
        if self.shared_mlp is None:
            return super().feed_forward(h, lora)
        return self.mlp(h) + self.shared_mlp(h, lora)  # tensor parallelism is refused

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """LoRA stacks on attention or the Mamba-2 mixer and on ``shared_mlp``
        (the MLP itself without experts, beside them with)."""
        out = super().enable_lora(num_slots, max_rank)
        if self.shared_mlp is not None:
            out.update(self.shared_mlp.enable_lora(num_slots, max_rank))
        return out


class GraniteMoeHybridCausalLM(HybridCausalLM, GraniteMoeCausalLM):
    takes_lora = True  # checked against PEFT (tests/unit/test_lora_engine.py)

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self._nope_layers = frozenset(cfg.options.nope_layers)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        layout = self.cfg.options.hybrid
        mixer = (None if layout.layer_kinds[index] == ATTENTION
                 else Mamba2Mixer(self.cfg, dtype, device, layout.state_index(index)))
        return GraniteMoeHybridDecoderLayer(self.cfg, dtype, device, f"model.layers.{index}", mixer)

    def rope_table(self, index: int) -> torch.Tensor | None:
        return None if index in self._nope_layers else self.cos_sin_cache

    def splits_shared_mlp(self) -> bool:
        return True  # every layer has one, as the MLP itself when there are no experts
