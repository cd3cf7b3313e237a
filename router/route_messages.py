"""What crosses a process boundary for traffic splitting (``routes:`` of the
operator file): the route policies a deploy hands the route controller, the
weights table it hands the ingresses, and the per-request outcomes the
ingresses send back.

  deploy (driver)  -- RoutePolicy ... ------------------->  route controller
  ingress          -- RouteReport (VariantOutcome ...) -->  route controller
                   <- RouteReply (RouteTable when changed) -

All are msgspec structs sent msgpack-encoded (``encode`` / ``decode_*``):
a misspelt or missing field fails to decode instead of becoming a default.
Lists and strings a sender controls are bounded, so a message decodes into
memory of the order of its own size.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

MAX_NAME_CHARS = 256  # route, variant and header names
MAX_VARIANTS = 64  # variants of one route
MAX_ROUTES = 1024
MAX_STEPS = 64  # steps of one ramp
MAX_OUTCOMES = 65536  # outcomes of one report (an ingress sends what it saw in one period)
MAX_EVENTS = 64  # ramp events a route keeps (the oldest are dropped)

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
Weight = Annotated[float, Meta(ge=0)]
Percent = Annotated[float, Meta(ge=0, le=100)]


class LatencyGuard(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The new variant's latency percentile may be at most ``max_ratio``
    times the baseline's."""

    percentile: Literal["p50", "p90", "p99"]
    max_ratio: Annotated[float, Meta(gt=0)]


class RampPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A route's ramp: ``variant`` gets ``steps[i]`` percent of the route's
    traffic at step i; the other variants share the rest in proportion to
    their configured weights (together: the baseline the guards compare
    with). See ``splitserve.router.ramp`` for how it moves."""

    variant: Name
    steps: Annotated[tuple[Percent, ...], Meta(min_length=1, max_length=MAX_STEPS)]
    hold_s: Annotated[float, Meta(ge=0)]
    min_requests: Annotated[int, Meta(ge=1)]
    max_error_rate: Annotated[float, Meta(ge=0, le=1)] | None = None
    max_error_rate_ratio: Annotated[float, Meta(gt=0)] | None = None
    error_rate_floor: Annotated[float, Meta(ge=0, le=1)] = 0.01
    ttft: LatencyGuard | None = None
    tpot: LatencyGuard | None = None
    rollback: Literal["previous", "zero"] = "previous"


class RoutePolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One route as the operator file declares it (``RouteSpec.policy``)."""

    name: Name
    variants: Annotated[tuple[Name, ...], Meta(min_length=1, max_length=MAX_VARIANTS)]
    weights: Annotated[tuple[Weight, ...], Meta(min_length=1, max_length=MAX_VARIANTS)]
    key_header: Name | None = None
    sticky: bool = True
    ramp: RampPolicy | None = None


class RouteWeights(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A route's weights in force, as the ingresses pick from them."""

    name: Name
    variants: Annotated[tuple[Name, ...], Meta(max_length=MAX_VARIANTS)]
    weights: Annotated[tuple[Weight, ...], Meta(max_length=MAX_VARIANTS)]
    key_header: Name | None = None
    sticky: bool = True


class RouteTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every route's weights; ``version`` changes whenever any weight does."""

    version: Annotated[int, Meta(ge=0)]
    routes: Annotated[tuple[RouteWeights, ...], Meta(max_length=MAX_ROUTES)] = ()

    def get(self, name: str) -> RouteWeights | None:
        for r in self.routes:
            if r.name == name:
                return r
        return None


class VariantOutcome(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """How one routed request ended, as its ingress saw it. ``ttft_s`` is
    -1 when no token came, ``tpot_s`` -1 with fewer than two tokens."""

    route: Name
    variant: Name
    ok: bool
    ttft_s: float = -1.0
    tpot_s: float = -1.0


class RouteReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An ingress's periodic report: what its routed requests did since the
    last one, and the table version it holds."""

    holder: Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
    seen: int = -1
    outcomes: Annotated[tuple[VariantOutcome, ...], Meta(max_length=MAX_OUTCOMES)] = ()


class RouteReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The controller's answer: the table, when the ingress's is stale."""

    version: int
    table: RouteTable | None = None


class RampEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One move of a ramp, and why (``splitserve status`` shows the last one)."""

    at: float  # wall-clock seconds
    kind: Literal["start", "advance", "complete", "rollback"]
    from_percent: float
    to_percent: float
    reason: str


class RampState(msgspec.Struct, forbid_unknown_fields=True):
    """Where a ramp stands; persisted so that a restarted controller resumes
    it (the current step's observations are not persisted: they restart)."""

    step: int  # index into RampPolicy.steps; -1: at 0 percent (rolled back to zero)
    status: Literal["ramping", "complete", "rolled_back"]
    step_started_at: float  # wall-clock seconds
    events: list[RampEvent] = msgspec.field(default_factory=list)


class BookState(msgspec.Struct, forbid_unknown_fields=True):
    """What the route controller persists: the policies in force, each
    ramp's state (by route name) and the table version."""

    version: int
    policies: tuple[RoutePolicy, ...] = ()
    ramps: dict[str, RampState] = msgspec.field(default_factory=dict)


_ENC = msgspec.msgpack.Encoder()
_DECODERS: dict[type, msgspec.msgpack.Decoder] = {}


def encode(msg: msgspec.Struct | tuple) -> bytes:
    return _ENC.encode(msg)


def decode(data: bytes, kind: type):
    """``kind`` from its msgpack bytes; raises msgspec.ValidationError /
    DecodeError on anything that is not exactly one."""
    dec = _DECODERS.get(kind)
    if dec is None:
        dec = _DECODERS[kind] = msgspec.msgpack.Decoder(kind)
    return dec.decode(data)
