"""The roles a worker replica plays, as one type every layer shares.

A replica is one of three: a prefill replica computes prompts and hands
their KV off; a decode replica receives KV and generates; a colocated
replica does both on one engine. The router keeps two pools per model:
prefill replicas in one, decode and colocated replicas (both take a
``Generate`` and may prefill locally) in the other. Torch-free, so the
router and the config schema can use it.
"""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    """A worker replica's role. Its value is the name the operator config,
    Serve application names (``<model>-<role>``) and metric labels use."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"

    @property
    def pool(self) -> "Role":
        """The router pool the replica is placed from: PREFILL or DECODE."""
        return Role.PREFILL if self is Role.PREFILL else Role.DECODE

    def __str__(self) -> str:
        return self.value
