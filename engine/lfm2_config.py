"""What Liquid's LFM2 family (LFM2, LFM2-MoE, LFM3) adds to the hybrid
decoder, read from config.json by its dialects (``splitserve.engine.
dialects.lfm2``): the gated short convolutions' shape and the few switches
that tell the three apart. ``FamilyOptions.lfm2`` holds one ``Lfm2Shape``."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.gemma4_config import LayerRope
from splitserve.engine.hybrid_config import StateKind

SHORT_CONV = "short_conv"  # the recurrent layer kind (``layer_types`` "conv")


@dataclass(frozen=True)
class Lfm2Shape:
    """``conv_kernel``: the depthwise convolution's taps (``conv_L_cache``);
    ``conv_bias``: in_proj, the convolution and out_proj carry biases;
    ``expert_bias`` (LFM2-MoE ``use_expert_bias``): a per-expert bias added
    to the router's sigmoid scores for choosing only; ``attention_gate``
    (LFM3 ``use_attention_gate``): each head's attention output times
    sigmoid(``g_proj`` of the layer input); ``ropes`` (LFM3): each layer's
    RoPE by its type (None on the convolution layers; empty: every layer
    rotates with ``ModelConfig``'s)."""

    hidden_size: int
    conv_kernel: int
    conv_bias: bool = False
    expert_bias: bool = False
    attention_gate: bool = False
    ropes: tuple[LayerRope | None, ...] = ()

    def __post_init__(self):
        if self.conv_kernel < 2:
            raise ValueError(f"conv_L_cache {self.conv_kernel} is not supported (at least 2 taps)")

    def states(self) -> tuple[StateKind, ...]:
        """The convolution's last ``conv_kernel - 1`` inputs per channel."""
        return (StateKind("conv", (self.hidden_size, self.conv_kernel - 1)),)
