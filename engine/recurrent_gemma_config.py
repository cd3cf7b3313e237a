"""What RecurrentGemma (Griffin) adds to the hybrid decoder, read from
config.json by its dialect (``splitserve.engine.dialects.recurrent_gemma``):
the shape of its recurrent blocks. ``FamilyOptions.rg_lru`` holds one
``RgLruShape``."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.hybrid_config import StateKind

RG_LRU = "rg_lru"  # the recurrent layer kind (``block_types`` "recurrent")


@dataclass(frozen=True)
class RgLruShape:
    """A recurrent block of ``lru_width`` channels: a causal depthwise
    convolution of ``conv_kernel`` taps (``conv1d_width``, with a bias) and
    the RG-LRU, whose gates are block-diagonal over ``num_heads`` blocks
    (``num_attention_heads``) of ``lru_width // num_heads`` channels."""

    lru_width: int
    num_heads: int
    conv_kernel: int

    def __post_init__(self):
        if self.lru_width % self.num_heads:
            raise ValueError(f"lru_width {self.lru_width} must be a multiple of num_attention_heads "
                             f"{self.num_heads}")
        if self.conv_kernel < 2:
            raise ValueError(f"conv1d_width {self.conv_kernel} is not supported (at least 2 taps)")

    @property
    def block_width(self) -> int:
        return self.lru_width // self.num_heads

    def states(self) -> tuple[StateKind, ...]:
        """The convolution's last ``conv_kernel - 1`` inputs and the RG-LRU's
        hidden state (float32, as transformers keeps it)."""
        return (StateKind("conv", (self.lru_width, self.conv_kernel - 1)),
                StateKind("recurrent", (self.lru_width,), "float32"))
