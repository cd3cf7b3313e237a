"""The router's configuration: its knobs and the facts of each model it serves.

``RouterConfig`` is the one schema of the router: the operator YAML's
``router`` section (``splitserve.cluster.config.RouterSpec``) uses its names
and defaults and builds it with ``RouterSpec.router_config``. ``ModelFacts``
come from each model (its checkpoint and engine settings), never from the
other models the router serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from splitserve.router.types import RouterConfigError, UnknownModelError


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the router must know of one model."""

    block_size: int
    """Tokens per KV block of the model's engines: prefix hashes are per block."""

    kv_bytes_per_token: int
    """KV cache bytes of one token (all layers, K and V): what a hand-off moves."""

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_bytes_per_token"):
            value = getattr(self, name)
            if value <= 0:
                raise RouterConfigError(f"ModelFacts.{name} must be > 0, got {value}")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Every knob of the router, and the models it serves. The defaults are
    the operator config's (``splitserve.cluster.config.RouterSpec`` takes
    them from here); all time values are seconds, bandwidths bytes per
    second."""

    policy: str = "cost"
    """Placement policy by registry name: cost, prefix_aware, least_loaded, round_robin."""

    models: Mapping[str, ModelFacts] = field(default_factory=dict)
    """What the router knows of each model it serves; any other model is unknown."""

    hash_salt: bytes = b""
    """Salt of ``splitserve.engine.hashing.block_hashes``; must equal the engines'."""

    max_queue_per_model: int = 256
    """Requests holding an admission slot per model (placed and not yet
    finished, or waiting in the queue) before new ones are refused at once
    (OverloadedError, HTTP 429)."""

    max_queue_delay_s: float = 30.0
    """Longest a new request waits before its prefill starts: in the
    router's queue for a replica that can take it, plus the predicted
    prefill queue of the replica chosen. A request that cannot be placed
    within it is refused (QueueTimeoutError, or QueueDelayError when the
    predicted prefill wait alone exceeds it: HTTP 429 with Retry-After), so
    admitted requests keep their TTFT past saturation. 0: no bound (a
    request waits until its own deadline or until its client leaves)."""

    max_resume_wait_s: float = 300.0
    """Longest a resumed stream (``RouteCall.resumed``: it produced tokens,
    then its decode replica failed) waits in the router's queue for another
    one. Not ``max_queue_delay_s``: such a stream already holds its client's
    work, so it goes ahead of new requests and waits longer than they may;
    it is refused (QueueTimeoutError) only past this, its own deadline, or
    ``no_replica_grace_s`` without a live decode replica. 0: no bound."""

    no_replica_grace_s: float = 10.0
    """A model with no live decode replica keeps queueing its requests this
    long (a replica restarting, a pool scaling from a lost node); after it,
    they are refused with NoReplicaError (HTTP 503) until one is back."""

    lease_ttl_s: float = 5.0
    """An ingress not heard from for this long is taken for dead: its
    admission slots are freed and its queued requests dropped. Ingresses
    renew every stats period; a live ingress whose slots expired (its event
    loop stalled) gets them back with its next heartbeat."""

    expected_output_tokens: int = 256
    """Output tokens a request is expected to produce, for its KV room on
    the decode replica, until the model's own output lengths are known
    (``output_tokens_quantile``); never more than its max_tokens. 0: hold
    room for max_tokens (no estimate)."""

    output_tokens_quantile: float = 0.9
    """Quantile of the model's recent output lengths (the last 512 finished
    requests) used as the expected output once 16 have finished. The decode
    engine preempts a sequence that outgrows a low guess."""

    stats_ttl_s: float = 5.0
    """Stats older than this are ignored: the replica may be dead or stuck.
    Only the backstop: a replica that stops deregisters, one an RPC fails
    to reach is suspect at once, and a new one is known from its first push."""

    network_bytes_per_s: float = 1.25e9
    """Usable bandwidth of one link between nodes (10 Gb/s)."""

    same_node_bytes_per_s: float = 50e9
    """Bandwidth between replicas with the same non-empty node_id (NVLink/PCIe)."""

    handoff_overhead_s: float = 0.002
    """Fixed cost of a remote hand-off (reservation RPC, stream setup) that
    a short prompt pays even when its bytes take no time."""

    local_prefill_max_tokens: int = 512
    """Uncached prompt tokens above which a decode replica never prefills
    locally: a long local prefill stalls every running sequence there."""

    prefer_local_prefill: bool = False
    """Prefill locally whenever local_prefill_max_tokens allows, whatever the
    predicted TTFT (the network is the bottleneck). RouterCore can also set
    this at run time from the autoscaler's signal."""

    assumed_prefill_tokens_per_s: float = 5000.0
    """Prefill speed assumed for a replica that has not measured its own yet."""

    prefix_weight: float = 0.5
    """How much decode load (0..1) a fully cached prompt is worth when
    choosing the decode replica: score = load - prefix_weight * cached fraction."""

    prefix_max_extra_queue_s: float = 0.25
    """prefix_aware: a prefill replica with a longer cached prefix wins only
    while its queue delay is at most this much above the shortest queue."""

    adapter_miss_weight: float = 0.2
    """How much decode load (0..1) not holding a request's LoRA adapter in a
    device slot costs when choosing the decode replica (half of it when the
    adapter is in the replica's host memory): the copy in, and the slot it
    takes from adapters there."""

    adapter_load_s: float = 0.05
    """Seconds a prefill replica is assumed to spend bringing a request's
    adapter into a device slot (half when it is in host memory), added to
    its predicted TTFT."""

    retry_after_min_s: float = 0.05
    """Lower clamp of OverloadedError.retry_after_s."""

    retry_after_max_s: float = 5.0
    """Upper clamp of OverloadedError.retry_after_s, also used before any
    request of the model has finished."""

    prefix_index_max_entries: int = 1_000_000
    """Block hashes the prefix index remembers (LRU beyond that). About 350
    bytes each when two replicas hold a block: 1M entries take ~350 MB."""

    prefix_index_touch_fraction: float = 0.25
    """Share of prefix matches that refresh the matched blocks' LRU position
    in the index (drawn at random). Refreshing costs more than matching;
    a prefix matched every few requests is refreshed often enough either way.
    1.0: every match refreshes (exact LRU)."""

    optimistic_updates: bool = True
    """Between stats pushes, count each placement against its replicas
    (queued prompt tokens, free blocks, waiting sequences) so a burst does
    not pile onto the replica that looked idlest at the last push."""

    optimistic_prefix_insert: bool = False
    """Also record each placed prompt's blocks as cached on its replicas
    before they report it, so a burst sharing a new prefix stays together.
    Off by default: it costs about a microsecond per prompt block and
    replica per decision, and at high request rates its entries push the
    replicas' own reports out of the LRU index."""

    def __post_init__(self) -> None:
        positive = {
            "max_queue_per_model": self.max_queue_per_model,
            "stats_ttl_s": self.stats_ttl_s,
            "lease_ttl_s": self.lease_ttl_s,
            "network_bytes_per_s": self.network_bytes_per_s,
            "same_node_bytes_per_s": self.same_node_bytes_per_s,
            "assumed_prefill_tokens_per_s": self.assumed_prefill_tokens_per_s,
            "prefix_index_max_entries": self.prefix_index_max_entries,
        }
        for name, value in positive.items():
            if value <= 0:
                raise RouterConfigError(f"RouterConfig.{name} must be > 0, got {value}")
        non_negative = {
            "handoff_overhead_s": self.handoff_overhead_s,
            "local_prefill_max_tokens": self.local_prefill_max_tokens,
            "prefix_weight": self.prefix_weight,
            "prefix_max_extra_queue_s": self.prefix_max_extra_queue_s,
            "adapter_miss_weight": self.adapter_miss_weight,
            "adapter_load_s": self.adapter_load_s,
            "retry_after_min_s": self.retry_after_min_s,
            "max_queue_delay_s": self.max_queue_delay_s,
            "max_resume_wait_s": self.max_resume_wait_s,
            "no_replica_grace_s": self.no_replica_grace_s,
            "expected_output_tokens": self.expected_output_tokens,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise RouterConfigError(f"RouterConfig.{name} must be >= 0, got {value}")
        if not 0.0 < self.prefix_index_touch_fraction <= 1.0:
            raise RouterConfigError(
                "RouterConfig.prefix_index_touch_fraction must be in (0, 1], got "
                f"{self.prefix_index_touch_fraction}"
            )
        if not 0.0 < self.output_tokens_quantile <= 1.0:
            raise RouterConfigError(
                "RouterConfig.output_tokens_quantile must be in (0, 1], got "
                f"{self.output_tokens_quantile}")
        if self.retry_after_max_s < self.retry_after_min_s:
            raise RouterConfigError(
                f"RouterConfig.retry_after_max_s ({self.retry_after_max_s}) must be >= "
                f"retry_after_min_s ({self.retry_after_min_s})"
            )
        for name, facts in self.models.items():
            if not isinstance(facts, ModelFacts):
                raise RouterConfigError(
                    f"RouterConfig.models[{name!r}] must be a ModelFacts, got {facts!r}")

    def model(self, name: str) -> ModelFacts:
        """The facts of model ``name``; raises UnknownModelError if not served."""
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(name, tuple(self.models)) from None
