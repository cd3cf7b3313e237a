"""RouterCore: the router's state and decisions, without Ray.

It keeps the latest stats each replica pushed (per model, in replica-id
order), the prefix index fed by the replicas' block events, per-model
admission control and decision counters, and places requests with the
configured policy. ``RouterService`` wraps one instance; every method is
synchronous and cheap (no I/O, no sleeping).

Between stats pushes each placement is counted against its replicas
(``RouterConfig.optimistic_updates``): queued prompt tokens on the prefill
replica, blocks and a waiting sequence on the decode replica. Otherwise
every request of a burst would see the same stats and pile onto the same
replica. The next push replaces the estimate with the replica's own
numbers, plus the placements made after the replica read them
(``splitserve.router.unreported``); requests placed before and still in
transit to it are briefly uncounted.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from splitserve.engine.hashing import block_hashes
from splitserve.router.admission import AdmissionControl
from splitserve.router.config import RouterConfig
from splitserve.router.cost_model import decode_blocks_needed
from splitserve.router.policies import get_policy
from splitserve.router.prefix_index import PrefixIndex
from splitserve.router.replica_pool import ReplicaPool, make_live_snapshot, make_snapshot
from splitserve.router.unreported import UnreportedPlacements
from splitserve.router.types import (
    ClusterSnapshot,
    DecodeReplicaStats,
    InvalidStatsError,
    NeverFitsError,
    NoCapacityError,
    OverloadedError,
    Placement,
    PolicyState,
    PrefillReplicaStats,
    QueueDelayError,
    RouteRequest,
    UnknownModelError,
    load_rank,
    queue_rank,
)

ReplicaStats = PrefillReplicaStats | DecodeReplicaStats


@dataclass(frozen=True, slots=True)
class RouterCounters:
    decisions: int  # placements returned
    local_prefill: int  # of which prefill runs on the decode replica
    no_capacity: int  # route() calls that raised NoCapacityError (not QueueDelayError)
    overloaded: int  # admit() calls refused
    by_reason: dict[str, int]
    in_flight: dict[str, int]  # admitted, not yet released, per model
    queue_delay: int = 0  # route() calls refused by RouterConfig.max_queue_delay_s


class RouterCore:
    def __init__(self, cfg: RouterConfig, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self._policy = get_policy(cfg.policy)
        self._clock = clock
        self.index = PrefixIndex(cfg.prefix_index_max_entries, cfg.prefix_index_touch_fraction)
        self.state = PolicyState()
        self._models = tuple(cfg.models)
        self._prefill: dict[str, ReplicaPool[PrefillReplicaStats]] = {
            m: ReplicaPool(queue_rank) for m in self._models
        }
        self._decode: dict[str, ReplicaPool[DecodeReplicaStats]] = {
            # no per-node groups: only the prefill pools' are read (prefill_by_node)
            m: ReplicaPool(load_rank, track_nodes=False) for m in self._models
        }
        self._admission = AdmissionControl(
            cfg.max_queue_per_model, cfg.retry_after_min_s, cfg.retry_after_max_s, clock
        )
        self._decisions = 0
        self._local_prefill = 0
        self._no_capacity = 0
        self._queue_delay_refusals = 0
        self._overloaded = 0
        self._by_reason: Counter[str] = Counter()
        self._unreported = UnreportedPlacements()

    # -- replica state ---------------------------------------------------

    def update_stats(self, stats: ReplicaStats) -> bool:
        """Record a replica's pushed stats; older than what is held: ignored.
        True when the replica was not known (new, or this router restarted or
        was reconfigured since): its prefix-cache state is then unknown too."""
        if stats.model not in self._prefill:
            raise UnknownModelError(stats.model, self._models)
        _check_stats(stats)
        pool = self._prefill if isinstance(stats, PrefillReplicaStats) else self._decode
        replicas = pool[stats.model]
        held = replicas.get(stats.replica_id)
        if held is not None:
            if stats.updated_at >= held.updated_at:
                replicas.put(self._with_unreported(stats))
            return False
        # A new id (or one that changed pool or model): forget its old role first.
        self.remove_replica(stats.replica_id)
        replicas.put(stats)
        return True

    def remove_replica(self, replica_id: str) -> bool:
        """Forget a replica's stats and cached blocks; False if it was unknown."""
        found = False
        for pool in (self._prefill, self._decode):
            for replicas in pool.values():
                found = replicas.pop(replica_id) is not None or found
        self.index.drop_replica(replica_id)
        self._unreported.drop_replica(replica_id)
        return found

    def _with_unreported(self, stats: ReplicaStats) -> ReplicaStats:
        """``stats`` plus the placements made on the replica after it read them."""
        late = self._unreported.after(stats.replica_id, stats.updated_at)
        if not late:
            return stats
        queued = sum(e.prefill_tokens for e in late)
        if isinstance(stats, PrefillReplicaStats):
            return _charged_prefill(stats, queued)
        needed = sum(decode_blocks_needed(stats, e.kv_tokens) for e in late)
        return _charged_decode(stats, needed, len(late), queued)

    def on_blocks_stored(self, replica_id: str, hashes: Sequence[int]) -> None:
        """A replica's block pool cached these blocks (a chain, first block first)."""
        self.index.on_stored(replica_id, hashes)

    def on_blocks_evicted(self, replica_id: str, hashes: Sequence[int]) -> None:
        self.index.on_evicted(replica_id, hashes)

    def replace_blocks(self, replica_id: str, hashes: Sequence[int]) -> None:
        """A replica's whole prefix cache (a snapshot): replaces what was held."""
        self.index.drop_replica(replica_id)
        self.index.on_stored(replica_id, hashes)

    def mark_suspect(self, replica_id: str) -> bool:
        """An RPC to this replica just failed (it died, or its node is gone):
        no placements on it until it pushes stats again. False if unknown."""
        found = False
        for pool in (self._prefill, self._decode):
            for replicas in pool.values():
                s = replicas.get(replica_id)
                if s is not None and s.healthy:
                    replicas.put(s.suspected())
                    found = True
        return found

    def has_live_decode(self, model: str) -> bool:
        """Whether some decode replica of ``model`` could take work now or
        soon: healthy, not draining, stats fresh (full ones count)."""
        horizon = self._clock() - self.cfg.stats_ttl_s
        return any(d.healthy and not d.draining and d.updated_at >= horizon
                   for d in self._decode[model])

    def never_fits(self, req: RouteRequest) -> NeverFitsError | None:
        """The error for a request no live decode replica of its model could
        ever hold (prompt + max_tokens over its whole KV cache, which the
        replica itself refuses), or None (it fits one, or none is live)."""
        need = req.prompt_len + req.max_tokens
        horizon = self._clock() - self.cfg.stats_ttl_s
        largest = -1
        for d in self._decode[req.model]:
            if d.healthy and not d.draining and d.updated_at >= horizon:
                largest = max(largest, d.total_blocks * d.block_size)
        if largest < 0 or need <= largest:
            return None
        return NeverFitsError(
            f"request {req.request_id!r} ({req.prompt_len} prompt + {req.max_tokens} new tokens) "
            f"can never fit a decode replica of model {req.model!r}: the largest holds {largest} "
            "tokens of KV. Lower max_tokens, or give the decode pool more KV blocks.", req.model)

    def set_prefer_local_prefill(self, prefer: bool) -> None:
        """The autoscaler's network signal: prefer prefilling on decode replicas."""
        self.state.prefer_local_prefill = prefer

    def snapshot(self, model: str) -> ClusterSnapshot:
        """Stats of ``model``'s replicas as the policies see them now."""
        if model not in self._prefill:
            raise UnknownModelError(model, self._models)
        return make_snapshot(self._prefill[model], self._decode[model], self._clock())

    # -- admission -------------------------------------------------------

    def admit(self, model: str, force: bool = False) -> None:
        """Take an in-flight slot for a request of ``model``; raises
        OverloadedError (with ``retry_after_s``) when the model is full,
        unless ``force`` (a request admitted before, counted again)."""
        if model not in self._prefill:
            raise UnknownModelError(model, self._models)
        try:
            self._admission.admit(model, force)
        except OverloadedError:
            self._overloaded += 1
            raise

    def check_room(self, model: str, needed: int) -> None:
        """Raise OverloadedError unless ``needed`` more requests of ``model``
        can be admitted now (``AdmissionControl.check``); takes nothing."""
        try:
            self._admission.check(model, needed)
        except OverloadedError:
            self._overloaded += needed
            raise

    def release(self, model: str, finished: bool = True) -> None:
        """Give back the slot of a request of ``model`` that ended
        (``finished``: normally; only those time Retry-After estimates)."""
        self._admission.release(model, finished)

    def retry_after_s(self, model: str) -> float:
        """Expected wait for a free slot of ``model`` (clamped)."""
        return self._admission.retry_after_s(model)

    # -- placement -------------------------------------------------------

    def route(self, req: RouteRequest, shed: bool = True, waited_s: float = 0.0) -> Placement:
        """Place ``req``: raises UnknownModelError or NoCapacityError
        (QueueDelayError when ``waited_s`` already spent waiting plus the
        predicted prefill wait exceed ``max_queue_delay_s``, only with
        ``shed``: pass False for a request already admitted, e.g. resumed
        after a fault)."""
        model, cfg = req.model, self.cfg
        prefills = self._prefill.get(model)
        if prefills is None:
            raise UnknownModelError(model, self._models)
        # the pools' own containers: the policy only reads them, and they
        # change after it returns (_count_placement)
        snap = make_live_snapshot(prefills, self._decode[model], self._clock())
        hashes = req.block_hashes
        if hashes is None:
            hashes = block_hashes(req.prompt_token_ids, cfg.model(model).block_size, cfg.hash_salt)
        matches = self.index.match(hashes)
        try:
            placement = self._policy(req, snap, matches, cfg, self.state)
            if shed and cfg.max_queue_delay_s > 0:
                wait = waited_s + self.queue_delay_s(model, placement)
                if wait > cfg.max_queue_delay_s:
                    raise self._queue_delay_error(req, placement, wait)
        except QueueDelayError:
            self._queue_delay_refusals += 1
            raise
        except NoCapacityError:
            self._no_capacity += 1
            raise
        self._decisions += 1
        self._by_reason[placement.reason] += 1
        if placement.prefill_replica is None:
            self._local_prefill += 1
        if cfg.optimistic_updates:
            self._count_placement(req, placement)
        if cfg.optimistic_prefix_insert:
            self._insert_prefix(placement, hashes)
        return placement

    def queue_delay_s(self, model: str, placement: Placement) -> float:
        """Predicted wait before ``placement``'s prefill starts: the chosen
        prefill replica's queue, or for a local prefill the decode replica's."""
        if placement.prefill_replica is not None:
            p = self._prefill[model].get(placement.prefill_replica)
            queued, speed = p.pending_prompt_tokens, p.prefill_tokens_per_s
        else:
            d = self._decode[model].get(placement.decode_replica)
            queued, speed = d.pending_prefill_tokens, d.prefill_tokens_per_s
        # prefill_queue_s / local_queue_s, inline (once per placement): the same division
        return queued / (speed if speed > 0 else self.cfg.assumed_prefill_tokens_per_s)

    def _queue_delay_error(self, req: RouteRequest, placement: Placement,
                           wait: float) -> QueueDelayError:
        """The refusal of a placement whose prefill would start after
        ``wait`` seconds, past ``max_queue_delay_s``."""
        limit = self.cfg.max_queue_delay_s
        retry = self._admission.clamp_retry_after(wait - limit)
        where = placement.prefill_replica or placement.decode_replica
        return QueueDelayError(
            f"request {req.request_id!r} would wait {wait:.3f} s for its prefill to start on "
            f"{where} (limit {limit:g} s, router.max_queue_delay_s); retry after "
            f"{retry:.3f} s", req.model, retry)

    def counters(self) -> RouterCounters:
        return RouterCounters(
            decisions=self._decisions,
            local_prefill=self._local_prefill,
            no_capacity=self._no_capacity,
            queue_delay=self._queue_delay_refusals,
            overloaded=self._overloaded,
            by_reason=dict(self._by_reason),
            in_flight={m: self._admission.in_flight(m) for m in self._models},
        )

    def uncount(self, model: str, decode_replica: str, kv_tokens: int,
                request_id: str | None = None) -> None:
        """Request ``request_id``, placed on ``decode_replica``, ended: give
        its blocks and batch slot back to the router's estimate until the
        next push (which replaces it), so the queue can use them at once."""
        if not self.cfg.optimistic_updates:
            return
        if request_id is not None:
            self._unreported.forget(request_id)
        decodes = self._decode.get(model)
        d = decodes.get(decode_replica) if decodes is not None else None
        if d is None:
            return
        waiting, running = d.waiting_requests, d.running_seqs
        if waiting > 0:
            waiting -= 1
        elif running > 0:
            running -= 1
        # d.free_blocks + decode_blocks_needed(d, kv_tokens), inline, at most all of them
        free, total = d.free_blocks - kv_tokens // -d.block_size, d.total_blocks
        decodes.put(d.counting(
            free_blocks=free if free < total else total,
            waiting_requests=waiting, pending_prefill_tokens=d.pending_prefill_tokens,
            running_seqs=running))

    def _count_placement(self, req: RouteRequest, placement: Placement) -> None:
        uncached = req.prompt_len - placement.prefix_hit_tokens
        model, prefill_id, kv_tokens = req.model, placement.prefill_replica, req.kv_tokens
        decodes = self._decode[model]
        d = decodes.get(placement.decode_replica)
        local = uncached if prefill_id is None else 0
        # _charged_decode(d, decode_blocks_needed(d, kv_tokens), 1, local), inline
        free = d.free_blocks + kv_tokens // -d.block_size  # minus the blocks needed
        decodes.put(d.counting(free_blocks=free if free > 0 else 0,
                               waiting_requests=d.waiting_requests + 1,
                               pending_prefill_tokens=d.pending_prefill_tokens + local))
        if prefill_id is not None:
            prefills = self._prefill[model]
            p = prefills.get(prefill_id)
            prefills.put(p.counting(pending_prompt_tokens=p.pending_prompt_tokens + uncached))
        self._unreported.add(req.request_id, self._clock(), d.replica_id, kv_tokens, local,
                             prefill_id, uncached)

    def _insert_prefix(self, placement: Placement, hashes: Sequence[int]) -> None:
        self.index.on_stored(placement.decode_replica, hashes)
        if placement.prefill_replica is not None:
            self.index.on_stored(placement.prefill_replica, hashes)


def _charged_decode(d: DecodeReplicaStats, blocks: int, requests: int,
                    local_tokens: int) -> DecodeReplicaStats:
    """``d`` with ``requests`` more placements counted on it: ``blocks`` KV
    blocks taken, each request waiting, ``local_tokens`` to prefill there."""
    return d.counting(free_blocks=max(d.free_blocks - blocks, 0),
                      waiting_requests=d.waiting_requests + requests,
                      pending_prefill_tokens=d.pending_prefill_tokens + local_tokens)


def _charged_prefill(p: PrefillReplicaStats, tokens: int) -> PrefillReplicaStats:
    """``p`` with ``tokens`` more uncached prompt tokens queued on it."""
    return p.counting(pending_prompt_tokens=p.pending_prompt_tokens + tokens)


def _check_stats(stats: ReplicaStats) -> None:
    """Reject stats the cost model would divide by or misread."""
    problems: list[str] = []
    if isinstance(stats, DecodeReplicaStats):
        if stats.block_size < 1:
            problems.append(f"block_size={stats.block_size} (must be >= 1)")
        if stats.total_blocks < 1:
            problems.append(f"total_blocks={stats.total_blocks} (must be >= 1)")
        if not 0 <= stats.free_blocks <= stats.total_blocks:
            problems.append(f"free_blocks={stats.free_blocks} (must be in 0..total_blocks)")
        if stats.max_seqs < 1:
            problems.append(f"max_seqs={stats.max_seqs} (must be >= 1)")
        counts = ("running_seqs", "waiting_requests", "pending_prefill_tokens")
    else:
        counts = ("pending_prompt_tokens", "running_requests")
    problems += [
        f"{name}={getattr(stats, name)} (must be >= 0)" for name in counts if getattr(stats, name) < 0
    ]
    if problems:
        raise InvalidStatsError(
            f"replica {stats.replica_id!r} (model {stats.model!r}) pushed invalid stats: "
            + ", ".join(problems)
        )
