"""Which decoder layers of a hybrid model attend over the paged KV cache and
which keep a fixed-size recurrent state per sequence instead (Qwen3-Next's
and Qwen3.5's Gated DeltaNet layers, LFM2's short convolutions, Mamba-2
layers). ``FamilyOptions.hybrid`` holds one ``HybridLayout``; the engine's
state store (``splitserve.engine.state_cache``) allocates the states it
lists, one slot per running sequence."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ATTENTION = "attention"  # the layer kind that reads and writes the paged KV cache


@dataclass(frozen=True)
class StateKind:
    """One tensor every recurrent layer keeps per sequence: ``shape`` (one
    sequence, one layer) in ``dtype``: "model" (the model's compute dtype)
    or "float32"."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "model"

    def __post_init__(self):
        if self.dtype not in ("model", "float32"):
            raise ValueError(f"state dtype must be 'model' or 'float32', got {self.dtype!r}")
        if not self.shape or any(int(d) <= 0 for d in self.shape):
            raise ValueError(f"state {self.name!r} has an empty or non-positive shape {self.shape}")


@dataclass(frozen=True)
class HybridLayout:
    """``layer_kinds``: per decoder layer, ``ATTENTION`` or the name of its
    recurrent kind; ``states``: what each recurrent layer keeps (every
    recurrent layer keeps the same kinds); ``attending_kinds``: recurrent
    kinds whose layers attend as well (Falcon-H1's Mamba-2 beside attention
    in one layer): such a layer keeps a state and a KV cache slice."""

    layer_kinds: tuple[str, ...]
    states: tuple[StateKind, ...]
    attending_kinds: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.state_layers:
            raise ValueError("a hybrid layout needs at least one recurrent layer")
        if not self.states:
            raise ValueError("a hybrid layout's recurrent layers must keep a state")

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == ATTENTION or k in self.attending_kinds)

    @property
    def state_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k != ATTENTION)

    @property
    def num_cache_layers(self) -> int:
        """Layers with a slice of the paged KV cache: the attending layers."""
        return len(self.attention_layers)

    def cache_index(self, layer: int) -> int:
        """Attention layer ``layer``'s index in the KV cache tensor."""
        return self.attention_layers.index(layer)

    def state_index(self, layer: int) -> int:
        """Recurrent layer ``layer``'s index in the state tensors."""
        return self.state_layers.index(layer)

    def state_bytes_per_sequence(self, model_elem_bytes: int) -> int:
        """One sequence's states over every recurrent layer."""
        total = 0
        for s in self.states:
            n = 1
            for d in s.shape:
                n *= int(d)
            total += n * (4 if s.dtype == "float32" else model_elem_bytes)
        return total * len(self.state_layers)


@dataclass(frozen=True)
class GatedDeltaNetShape:
    """A Gated DeltaNet layer (Qwen3-Next, Qwen3.5): ``num_k_heads`` query/key
    heads of ``k_head_dim``, ``num_v_heads`` value heads of ``v_head_dim``
    (each query/key head serves ``num_v_heads // num_k_heads`` of them), a
    causal depthwise convolution of ``conv_kernel`` taps over q, k and v.
    ``fused_projections``: q, k, v and the gate z in one ``in_proj_qkvz``
    grouped per key head, b and a in ``in_proj_ba`` (Qwen3-Next); else
    ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a`` (Qwen3.5)."""

    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int
    fused_projections: bool = True
    # OLMo Hybrid linear_allow_neg_eigval: beta = sigmoid(b) times this (2: beta in (0, 2),
    # negative eigenvalues in the state's update); 1: Qwen's
    beta_scale: float = 1.0
    # the output norm's epsilon (OLMo Hybrid's o_norm: 1e-5, FLA's default); None: rms_norm_eps
    norm_eps: float | None = None
    # Bailing hybrid kda_safe_gate: the KDA forget gate is this lower bound times
    # sigmoid(exp(A_log) * (f + dt_bias)); None: -exp(A_log) * softplus(f + dt_bias) (Kimi's)
    forget_gate_bound: float | None = None

    def __post_init__(self):
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"linear_num_value_heads {self.num_v_heads} must be a multiple of "
                             f"linear_num_key_heads {self.num_k_heads}")
        if self.conv_kernel < 1:
            raise ValueError(f"linear_conv_kernel_dim must be at least 1, got {self.conv_kernel}")

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.k_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.v_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def split(self, size: int) -> "GatedDeltaNetShape":
        """One of ``size`` tensor-parallel ranks' part: ``num_k_heads / size``
        key heads and the ``num_v_heads / size`` value heads they serve."""
        return dataclasses.replace(self, num_k_heads=self.num_k_heads // size,
                                   num_v_heads=self.num_v_heads // size)

    def states(self) -> tuple[StateKind, ...]:
        """The convolution's last ``conv_kernel - 1`` inputs and the delta rule's
        [v heads, k dim, v dim] state (float32, as transformers keeps it)."""
        return (StateKind("conv", (self.conv_dim, max(self.conv_kernel - 1, 1))),
                StateKind("recurrent", (self.num_v_heads, self.k_head_dim, self.v_head_dim), "float32"))
