"""The shape of a Mamba-1 (selective state space) layer: Mamba's and
Falcon-Mamba's every layer, Jamba's ``mamba`` layers
(``splitserve.engine.models.mamba1``). ``FamilyOptions.mamba`` holds one."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.hybrid_config import StateKind

# the norms on each token's dt, B and C before the scan: none (Mamba), RMS norms without a
# weight (Falcon-Mamba), RMS norms with one (Jamba's dt_layernorm, b_layernorm, c_layernorm)
DT_NORMS = ("", "weightless", "weighted")


@dataclass(frozen=True)
class Mamba1Shape:
    """``inner`` channels (expand x hidden) through a causal depthwise
    convolution of ``conv_kernel`` taps (a bias where ``conv_bias``), a
    selective scan with a [inner, ``state_size``] state, dt of ``dt_rank``
    dims projected up; ``proj_bias``: in_proj and out_proj carry biases;
    ``dt_norms`` one of ``DT_NORMS``, with epsilon ``dt_norm_eps``."""

    inner: int
    state_size: int
    conv_kernel: int
    dt_rank: int
    conv_bias: bool = True
    proj_bias: bool = False
    dt_norms: str = ""
    dt_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.conv_kernel < 2:
            raise ValueError(f"a convolution of {self.conv_kernel} taps is not supported (at least 2)")
        if min(self.inner, self.state_size, self.dt_rank) <= 0:
            raise ValueError(f"Mamba sizes must be positive: inner {self.inner}, state {self.state_size}, "
                             f"dt rank {self.dt_rank}")
        if self.dt_norms not in DT_NORMS:
            raise ValueError(f"dt_norms must be one of {DT_NORMS}, got {self.dt_norms!r}")

    def states(self) -> tuple[StateKind, ...]:
        """The convolution's last ``conv_kernel - 1`` inputs and the scan's
        [inner, state_size] state (float32)."""
        return (StateKind("conv", (self.inner, self.conv_kernel - 1)),
                StateKind("ssm", (self.inner, self.state_size), "float32"))
