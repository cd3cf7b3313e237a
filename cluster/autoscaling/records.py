"""What an autoscaling decision leaves behind, typed: the record the Serve
policy (inside Serve's controller) sends to the ops ledger actor and to the
metrics, and what ``splitserve status`` reads back from the ledger."""

from __future__ import annotations

import msgspec


class DecisionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One pool's decision at one control-loop tick."""

    app: str  # the pool's Serve application
    model: str
    role: str  # prefill | decode | colocated
    bottleneck: str  # compute | memory | network | requests
    time: float  # wall-clock seconds of the decision
    running: int  # replicas running when it was made
    current: int  # Serve's target before it
    target: int  # replicas the pool should have now
    desired: int  # what the load alone asks for (before delays, cooldown and bounds)
    value: float | None  # the bottleneck's load against its target (1.0 = on target); None: no metrics
    reason: str  # why, in words
    min: int  # the bounds in force
    max: int
    changed: bool  # target != current
    prefer_local_prefill: bool | None  # network: the router's switch; None: not a network pool


class PoolDecisions(msgspec.Struct, frozen=True, kw_only=True):
    """What the ledger keeps of one pool: its latest decision and the latest
    that changed its size."""

    latest: DecisionRecord
    last_change: DecisionRecord | None
