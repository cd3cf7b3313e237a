"""Contracts of the router: replica stats in, placements out, and its errors.

The router's view of each replica is a ``PrefillReplicaStats`` /
``DecodeReplicaStats`` (made from the ``StatsReport`` it pushes,
``splitserve.router.reports``); the ingress sends a ``RouteRequest`` and
gets a ``Placement`` back, or a ``RouteRefusal``. The router's knobs are in
``splitserve.router.config``. Everything here is plain data that is never changed once built, so policies stay pure
functions over a ``ClusterSnapshot`` and the router actor can ship these
objects as they are. The messages that cross to the router actor
(``RouteRequest``, ``Placement``) are frozen msgspec structs. The records
rebuilt on every decision (replica stats, snapshots) are not ``frozen``
dataclasses only because a frozen constructor costs three times as much; nothing assigns to them after
construction (RouterCore replaces stats with ``counting()`` copies).
Times (``updated_at``, ``now``) are wall-clock seconds (``time.time()``) so
stats stamped on one node can be aged on another.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Callable, Mapping, Union

import msgspec

from splitserve.engine.roles import Role


class RouterError(Exception):
    """Base class of every error the router raises on purpose. Each one
    pickles with its fields; a ``RouteRefusal`` crosses the router actor's
    boundary as a ``splitserve.router.exchange_codec.WireRefusal`` and is
    rebuilt as itself."""


class UnknownModelError(RouterError, LookupError):
    """A request or a replica names a model the router was not configured with."""

    def __init__(self, model: str, known: tuple[str, ...]):
        self.model = model
        self.known = tuple(known)
        super().__init__(
            f"unknown model {model!r}; this router serves {sorted(known)}. "
            "Add it to the operator YAML's models list or fix the model name."
        )

    def __reduce__(self):
        return type(self), (self.model, self.known)


class NoCapacityError(RouterError):
    """No replica of the request's model can take it right now."""

    def __init__(self, message: str, model: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.model = model
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (str(self), self.model, self.retry_after_s)


class NeverFitsError(NoCapacityError):
    """The request needs more KV (prompt + max_tokens) than the largest live
    decode replica of its model holds in all: no wait makes it fit. The
    client sees 400 naming ``max_tokens``."""


class QueueDelayError(NoCapacityError):
    """The best placement would wait longer than ``RouterConfig.max_queue_delay_s``
    before its prefill starts (the pools are past saturation). The client
    sees 429 (RESOURCE_EXHAUSTED) with Retry-After."""


class QueueTimeoutError(QueueDelayError):
    """The request waited in its model's queue until its deadline
    (``RouterConfig.max_queue_delay_s``, or its own) without a replica able
    to take it. 429 with Retry-After, like a full queue."""


class NoReplicaError(NoCapacityError):
    """The model has had no live decode replica for longer than
    ``RouterConfig.no_replica_grace_s``: 503 with Retry-After."""


class OverloadedError(RouterError):
    """A model's in-flight queue is full; retry after ``retry_after_s``."""

    def __init__(self, model: str, in_flight: int, limit: int, retry_after_s: float,
                 needed: int = 1):
        """``needed``: the slots the request asked for at once (its choices,
        ``Exchange.groups``)."""
        self.model = model
        self.in_flight = in_flight
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.needed = needed
        choices = f" and the request's {needed} choices need {needed} slots" if needed > 1 else ""
        super().__init__(
            f"model {model!r} has {in_flight} requests in flight (limit {limit}){choices}; "
            f"retry after {retry_after_s:.3f} s or raise router.max_queue_per_model"
        )

    def __reduce__(self):
        return type(self), (self.model, self.in_flight, self.limit, self.retry_after_s,
                            self.needed)


# What the router actor's ``route`` answers instead of a placement: the
# request cannot be placed now (retry later, elsewhere) or names no model
# the router serves.
RouteRefusal = Union[OverloadedError, NoCapacityError, UnknownModelError]


class UnbalancedReleaseError(RouterError):
    """``release(model)`` was called more often than ``admit(model)``."""


class InvalidRouteRequestError(RouterError, ValueError):
    """A ``RouteRequest`` is inconsistent; the message names the field."""


class InvalidStatsError(RouterError, ValueError):
    """A replica pushed stats that cannot be right (zero block size, free
    blocks above total, ...); the message names the replica and field."""


class RouterConfigError(RouterError, ValueError):
    """A ``RouterConfig`` value is out of range or names an unknown policy."""


_new_object = object.__new__


@dataclass(slots=True, kw_only=True)
class PrefillReplicaStats:
    replica_id: str
    model: str
    pending_prompt_tokens: int  # queued and running prompt tokens not yet computed
    running_requests: int
    prefill_tokens_per_s: float  # measured throughput; <= 0 means not measured yet
    healthy: bool = True
    draining: bool = False
    node_id: str = ""  # "" = unknown node, treated as remote to every other replica
    updated_at: float
    adapters: frozenset[str] = frozenset()  # LoRA adapters (keys) in its device slots
    host_adapters: frozenset[str] = frozenset()  # ... and in its host memory
    # Derived, not sent: seconds of queued prompt work at the measured speed
    # (0 before a measurement, a lower bound then). Stored so policies can
    # order replicas by it at C speed.
    queue_s: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        speed = self.prefill_tokens_per_s
        self.queue_s = self.pending_prompt_tokens / speed if speed > 0 else 0.0

    def counting(self, *, pending_prompt_tokens: int) -> PrefillReplicaStats:
        """A copy with another queue (the router's estimate between pushes).
        Filled slot by slot: half the cost of the keyword constructor, once
        per placement (every field is copied: tests/unit/test_router_stats_copy.py)."""
        c = _new_object(PrefillReplicaStats)
        c.replica_id = self.replica_id
        c.model = self.model
        c.pending_prompt_tokens = pending_prompt_tokens
        c.running_requests = self.running_requests
        c.prefill_tokens_per_s = self.prefill_tokens_per_s
        c.healthy = self.healthy
        c.draining = self.draining
        c.node_id = self.node_id
        c.updated_at = self.updated_at
        c.adapters = self.adapters
        c.host_adapters = self.host_adapters
        c.__post_init__()
        return c

    def suspected(self) -> PrefillReplicaStats:
        """A copy marked unhealthy: an RPC failed to reach the replica."""
        return replace(self, healthy=False)


@dataclass(slots=True, kw_only=True)
class DecodeReplicaStats:
    replica_id: str
    model: str
    free_blocks: int
    total_blocks: int
    running_seqs: int
    max_seqs: int
    block_size: int
    # admitted by the replica but not yet in its running batch: queued
    # prompts, imports held for a batch slot, open hand-off reservations
    waiting_requests: int
    decode_step_s: float  # recent mean time of one decode step
    prefill_tokens_per_s: float  # local prefill speed; <= 0 means not measured yet
    pending_prefill_tokens: int = 0  # prompt tokens queued for local prefill here
    healthy: bool = True
    draining: bool = False
    node_id: str = ""
    updated_at: float
    adapters: frozenset[str] = frozenset()  # LoRA adapters (keys) in its device slots
    host_adapters: frozenset[str] = frozenset()  # ... and in its host memory
    # Derived, not sent: how full the replica is once one more sequence
    # joins, by its binding resource: max((running + waiting + 1) / max_seqs,
    # (used blocks + 1) / total_blocks), 0 idle .. 1 full. Decode replicas are
    # ranked by it; it ignores the request's size so policies can sort by it
    # at C speed (whether the request fits is checked on its own).
    load: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_seqs > 0 and self.total_blocks > 0:
            slots = (self.running_seqs + self.waiting_requests + 1) / self.max_seqs
            blocks = (self.total_blocks - self.free_blocks + 1) / self.total_blocks
            load = slots if slots > blocks else blocks
        else:
            load = float("inf")
        self.load = load

    def counting(
        self, *, free_blocks: int, waiting_requests: int, pending_prefill_tokens: int,
        running_seqs: int | None = None,
    ) -> DecodeReplicaStats:
        """A copy with other counts (the router's estimate between pushes),
        filled slot by slot as ``PrefillReplicaStats.counting``."""
        c = _new_object(DecodeReplicaStats)
        c.replica_id = self.replica_id
        c.model = self.model
        c.free_blocks = free_blocks
        c.total_blocks = self.total_blocks
        c.running_seqs = self.running_seqs if running_seqs is None else running_seqs
        c.max_seqs = self.max_seqs
        c.block_size = self.block_size
        c.waiting_requests = waiting_requests
        c.decode_step_s = self.decode_step_s
        c.prefill_tokens_per_s = self.prefill_tokens_per_s
        c.pending_prefill_tokens = pending_prefill_tokens
        c.healthy = self.healthy
        c.draining = self.draining
        c.node_id = self.node_id
        c.updated_at = self.updated_at
        c.adapters = self.adapters
        c.host_adapters = self.host_adapters
        c.__post_init__()
        return c

    def suspected(self) -> DecodeReplicaStats:
        """A copy marked unhealthy: an RPC failed to reach the replica."""
        return replace(self, healthy=False)


class RouteRequest(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One request to place. Give either ``prompt_token_ids`` (the router
    hashes them) or ``block_hashes`` precomputed with ``splitserve.engine.hashing`` at
    the router's block size and salt (the ingress can do this off the
    router's critical path). A msgspec struct: it crosses to the router
    actor in every exchange (``splitserve.router.exchange_codec``), and its
    constructor costs a tenth of a frozen dataclass's."""

    request_id: str
    model: str
    prompt_len: int
    max_tokens: int
    prompt_token_ids: tuple[int, ...] = ()
    block_hashes: tuple[int, ...] | None = None
    exclude_replicas: frozenset[str] = frozenset()  # replicas that already refused it
    expected_output_tokens: int | None = None
    """Output tokens to hold KV room for (the router's estimate, at most
    ``max_tokens``); None: ``max_tokens``."""
    adapter: str | None = None
    """The key of the LoRA adapter it runs with (``AdapterRef.key``, its
    digest); None: the base model. Its ``block_hashes`` are rooted in it."""
    refused_by: frozenset[str] = frozenset()
    """Of ``exclude_replicas``, those that refused it for want of KV room
    (live replicas whose room the router's view overstated, as when a dead
    replica's streams all land on the survivors at once). A queued request
    that no other replica can take goes back to one of them once it has
    reported its load after the request was queued."""

    def expecting(self, output_tokens: int) -> RouteRequest:
        """A copy with ``expected_output_tokens`` set (built directly: cheaper
        than ``dataclasses.replace`` on every placement)."""
        return RouteRequest(self.request_id, self.model, self.prompt_len, self.max_tokens,
                            self.prompt_token_ids, self.block_hashes, self.exclude_replicas,
                            output_tokens, self.adapter, self.refused_by)

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV a decode replica must have room for to take it."""
        expected = self.expected_output_tokens
        if expected is None or expected > self.max_tokens:
            return self.prompt_len + self.max_tokens
        return self.prompt_len + expected

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise InvalidRouteRequestError(
                f"request {self.request_id!r}: prompt_len must be >= 1, got {self.prompt_len}"
            )
        if self.max_tokens < 1:
            raise InvalidRouteRequestError(
                f"request {self.request_id!r}: max_tokens must be >= 1, got {self.max_tokens}"
            )
        if self.block_hashes is None:
            if len(self.prompt_token_ids) != self.prompt_len:
                raise InvalidRouteRequestError(
                    f"request {self.request_id!r}: prompt_token_ids has {len(self.prompt_token_ids)} "
                    f"tokens but prompt_len is {self.prompt_len}; pass the prompt's token ids "
                    "or its precomputed block_hashes"
                )


@dataclass(slots=True)
class ClusterSnapshot:
    """One model's replicas as a policy sees them. ``prefill``/``decode``
    are in replica-id order. The other views are derived from them: pass
    them only when they are already at hand (RouterCore keeps them up to
    date as stats change); otherwise they are computed here."""

    prefill: tuple[PrefillReplicaStats, ...]
    decode: tuple[DecodeReplicaStats, ...]
    now: float
    prefill_by_id: Mapping[str, PrefillReplicaStats] | None = None
    decode_by_id: Mapping[str, DecodeReplicaStats] | None = None
    prefill_by_queue: tuple[PrefillReplicaStats, ...] | None = None
    """Ascending (queue_s, replica_id)."""
    decode_by_load: tuple[DecodeReplicaStats, ...] | None = None
    """Ascending (load, replica_id)."""
    max_prefill_tokens_per_s: float | None = None
    """Highest measured prefill speed in ``prefill`` (0.0 when none)."""
    prefill_by_node: Mapping[str, tuple[PrefillReplicaStats, ...]] | None = None
    """node id -> the prefill replicas on it, ascending (queue_s, replica_id);
    replicas whose node is unknown ("") are in none."""

    def __post_init__(self) -> None:
        if None not in (
            self.prefill_by_id,
            self.decode_by_id,
            self.prefill_by_queue,
            self.decode_by_load,
            self.max_prefill_tokens_per_s,
            self.prefill_by_node,
        ):
            return  # RouterCore passes every view
        derived = {
            "prefill_by_id": lambda: {p.replica_id: p for p in self.prefill},
            "decode_by_id": lambda: {d.replica_id: d for d in self.decode},
            "prefill_by_queue": lambda: tuple(sorted(self.prefill, key=queue_order)),
            "decode_by_load": lambda: tuple(sorted(self.decode, key=load_order)),
            "max_prefill_tokens_per_s": lambda: max(
                (p.prefill_tokens_per_s for p in self.prefill), default=0.0
            ),
            "prefill_by_node": lambda: _group_by_node(self.prefill_by_queue),
        }
        for name, compute in derived.items():
            if getattr(self, name) is None:
                setattr(self, name, compute())


def _group_by_node(
    ordered: tuple[PrefillReplicaStats, ...],
) -> dict[str, tuple[PrefillReplicaStats, ...]]:
    groups: dict[str, list[PrefillReplicaStats]] = {}
    for p in ordered:
        if p.node_id:
            groups.setdefault(p.node_id, []).append(p)
    return {node: tuple(g) for node, g in groups.items()}


# Sort keys of ``ClusterSnapshot.prefill_by_queue`` ((queue_s, replica_id))
# and ``ClusterSnapshot.decode_by_load`` ((load, replica_id)): attrgetters,
# which build the key at C speed (ReplicaPool makes one per placement).
queue_order: Callable[[PrefillReplicaStats], tuple[float, str]] = attrgetter("queue_s", "replica_id")
load_order: Callable[[DecodeReplicaStats], tuple[float, str]] = attrgetter("load", "replica_id")
# Their first parts, by which ReplicaPool ranks (ties on the replica id).
queue_rank: Callable[[PrefillReplicaStats], float] = attrgetter("queue_s")
load_rank: Callable[[DecodeReplicaStats], float] = attrgetter("load")


class Placement(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="placement"):
    """Where a request runs (tagged: it shares the exchange reply's outcome
    union with the refusals, ``splitserve.router.exchange_codec``)."""

    prefill_replica: str | None  # None = prefill locally on the decode replica
    decode_replica: str
    reason: str  # one of the REASON_* constants
    predicted_ttft_s: float
    prefix_hit_tokens: int  # cached prompt tokens on the replica that runs the prefill


@dataclass(slots=True)
class PolicyState:
    """What a policy may remember between decisions; RouterCore owns one and
    passes it to every call."""

    round_robin_next: dict[tuple[str, Role], int] = field(default_factory=dict)
    """(model, Role.PREFILL | Role.DECODE) -> position of the next pick in the cycle."""

    prefer_local_prefill: bool = False
    """Set at run time when the autoscaler reports the network as the bottleneck."""


# Why a placement was made; RouterCore counts decisions by these.
REASON_ROUND_ROBIN = "round_robin"
REASON_LEAST_LOADED = "least_loaded"
REASON_PREFIX_HIT = "prefix_hit"
REASON_REMOTE_CHEAPER = "remote_cheaper"
REASON_LOCAL_CHEAPER = "local_cheaper"
REASON_LOCAL_PREFERRED = "local_preferred"  # network flagged as the bottleneck
REASON_LOCAL_OVER_LIMIT = "local_over_limit"  # local was cheaper but the prompt is too long
REASON_NO_PREFILL_REPLICA = "no_prefill_replica"  # prefill pool empty: prefill on decode
