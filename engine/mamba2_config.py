"""The shape of a Mamba-2 layer (Granite 4.0-H's, Bamba's, Nemotron-H's,
Falcon-H1's and Zamba2's), read from config.json by the families' dialects
and held in ``FamilyOptions.mamba2``; ``splitserve.engine.models.mamba2``
builds it."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.hybrid_config import StateKind

SSM_KIND = "mamba2"  # the layer kind of Mamba-2 layers in a HybridLayout


@dataclass(frozen=True)
class Mamba2Shape:
    """``num_heads`` heads of ``head_dim`` (together the layer's inner width),
    each with a [head_dim, state_size] state; B and C in ``n_groups`` groups
    (each serving ``num_heads // n_groups`` consecutive heads); a causal
    depthwise convolution of ``conv_kernel`` taps over x, B and C (a bias
    when ``conv_bias``); biases on in_proj / out_proj when ``proj_bias``;
    the time step clamped to ``time_step_limit`` after its softplus; the
    gated RMSNorm over ``n_groups`` groups of the inner width, the gate
    applied after the norm when ``norm_before_gate``, else before it (the
    fields after it: where Falcon-H1's and Zamba2's layers differ)."""

    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    conv_kernel: int
    conv_bias: bool = True
    proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    norm_before_gate: bool = False
    # Falcon-H1 mamba_rms_norm: False: no gated RMSNorm, the scan output times SiLU(z) only
    gated_norm: bool = True
    # Falcon-H1 projectors_bias: out_proj's bias apart from in_proj's; None: as proj_bias
    out_proj_bias: bool | None = None
    # Falcon-H1 ssm_multipliers (its mup_vector): in_proj's z, x, B, C and dt outputs each
    # multiplied by one factor; None: none
    in_proj_scales: tuple[float, float, float, float, float] | None = None
    # Zamba2: the gated norm's epsilon (1e-5 whatever rms_norm_eps says); None: rms_norm_eps
    norm_eps: float | None = None

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "n_groups", "state_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"mamba {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.n_groups:
            raise ValueError(f"mamba_n_groups {self.n_groups} must divide mamba_n_heads {self.num_heads}")
        if self.conv_kernel < 2:
            raise ValueError(f"mamba_d_conv {self.conv_kernel} is not supported (at least 2 taps)")
        if self.in_proj_scales is not None and len(self.in_proj_scales) != 5:
            raise ValueError(f"ssm_multipliers must be 5 factors (z, x, B, C, dt), got {self.in_proj_scales}")
        lo, hi = self.time_step_limit
        if not 0.0 <= lo < hi:
            raise ValueError(f"time_step_limit {self.time_step_limit} must be (low, high), 0 <= low < high")

    @property
    def inner(self) -> int:
        """The width of x, the gate z and the scan output: heads x head_dim."""
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """The convolution's channels: x, then B and C of every group."""
        return self.inner + 2 * self.n_groups * self.state_size

    def in_proj_scale(self) -> list[float] | None:
        """One factor per in_proj output row ([z | x | B | C | dt]); None: none."""
        if self.in_proj_scales is None:
            return None
        gs = self.n_groups * self.state_size
        widths = (self.inner, self.inner, gs, gs, self.num_heads)
        return [f for f, w in zip(self.in_proj_scales, widths) for _ in range(w)]

    def states(self) -> tuple[StateKind, ...]:
        """The convolution's last ``conv_kernel - 1`` inputs (model dtype) and
        the scan's [heads, head_dim, state_size] state (float32)."""
        return (StateKind("conv", (self.conv_dim, self.conv_kernel - 1)),
                StateKind("ssm", (self.num_heads, self.head_dim, self.state_size), "float32"))
