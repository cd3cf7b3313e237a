"""RouterService: what one router offers ingresses, over ``RouterCore``.

Request lifecycle at the router (``splitserve.router.exchange`` has the messages):

  RouteCall -> admitted (a lease)      refused at once when the model holds
            |                          ``max_queue_per_model`` leases (429)
            v
  placed now  or  Waiting in its model's WaitQueue, in (priority, arrival) order
            |                |
            |                +-> placed when a replica can take it (a stats
            |                |   push, a release or a suspect changed the
            |                |   pool's capacity); its outcome waits for the
            |                |   holder's ``take_resolved``
            |                +-> refused at its deadline (QueueTimeoutError,
            |                |   429), or when the model has had no live
            |                |   decode replica for ``no_replica_grace_s``
            |                |   (NoReplicaError, 503)
            v
  Placement (the lease holds the KV room counted on the decode replica)
            |
            v
  LeaseEnd from the holder (frees the slot, gives the KV room back to the
  router's estimate, teaches the output-length estimator), or the holder's
  ``live`` list no longer names it, or the holder went silent (expired).

A request is placed with KV room for its expected output
(``splitserve.router.estimator``), not its max_tokens. The queue is served
in order: the first request that no replica can take stops the walk,
except one that excluded replicas itself (a retry) and may be the only one
unable to use what is free. A request's choices (n > 1) are admitted all
or none by ``splitserve.router.choice_groups``. Every method is synchronous, cheap and
deterministic given the clock: the router actor calls them from one thread.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Callable, Mapping

import msgspec

from splitserve.router.choice_groups import (
    NO_CAPACITY,
    NO_REPLICA,
    OVERLOADED,
    QUEUE_DELAY,
    QUEUE_TIMEOUT,
    refusal_reason,
    submit_grouped,
)
from splitserve.router.config import RouterConfig
from splitserve.router.core import ReplicaStats, RouterCore
from splitserve.router.estimator import OutputLengths
from splitserve.router.exchange import QUEUED, Exchange, ExchangeReply, LeaseEnd, Outcome, Queued, RouteCall
from splitserve.router.leases import Lease, LeaseTable
from splitserve.router.types import (
    DecodeReplicaStats,
    NoCapacityError,
    NoReplicaError,
    OverloadedError,
    Placement,
    QueueDelayError,
    QueueTimeoutError,
    RouteRefusal,
    RouteRequest,
    UnknownModelError,
)
from splitserve.router.wait_queue import WaitQueue, Waiting

_INF = float("inf")

# the refusal reason labels live in choice_groups, whose grouped admission
# counts them too; re-exported here, where the service's callers look
__all__ = ["RouterService", "OVERLOADED", "QUEUE_DELAY", "QUEUE_TIMEOUT", "NO_REPLICA",
           "NO_CAPACITY"]


class RouterService:
    def __init__(self, cfg: RouterConfig, clock: Callable[[], float] = time.time,
                 incarnation: str | None = None):
        self.cfg = cfg
        self._clock = clock
        self.core = RouterCore(cfg, clock)
        self.incarnation = incarnation or uuid.uuid4().hex
        self.leases = LeaseTable(cfg.lease_ttl_s)
        self.lengths = OutputLengths(cfg.expected_output_tokens, cfg.output_tokens_quantile)
        self._queues: dict[str, WaitQueue] = {m: WaitQueue() for m in cfg.models}
        # key of the queued request that found no capacity, until capacity changes
        self._blocked: dict[str, tuple | None] = dict.fromkeys(cfg.models)
        now = clock()
        # last time each model had a live decode replica; a new router gives
        # its replicas one grace period to report before refusing with 503
        self._live_at: dict[str, float] = dict.fromkeys(cfg.models, now)
        # decode replica -> when its last stats push arrived (the router's clock)
        self._pushed_at: dict[str, float] = {}
        self._resolved: dict[str, list[tuple[str, Outcome]]] = {}
        self.counts: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.on_refusal: Callable[[str, str], None] | None = None  # (model, reason)
        self.on_placement: Callable[[str, str], None] | None = None  # (model, reason)

    # -- the ingress' exchange ------------------------------------------------------
    def exchange(self, ex: Exchange) -> ExchangeReply:
        """Releases, suspects and the ``live`` list first (they free slots and
        capacity for the queue's older requests), then the calls in the order
        the queue would serve them (resumed streams, priority, arrival); one
        outcome per call, in the calls' order."""
        now = self._clock()
        self.leases.renew(ex.holder, now)
        touched: set[str] = set()
        for end in ex.releases:
            self._release(end, ex.seen, now, touched)
        for rid in ex.suspects:
            self.suspect(rid)
        if ex.live is not None:
            self._reconcile(ex.holder, ex.live, now, touched)
        for model in touched:
            self._pump(model, now)
        calls = ex.calls
        if ex.groups:  # a request's choices (n > 1): never on the n = 1 path below
            return ExchangeReply(self.incarnation, submit_grouped(self, ex.holder, calls,
                                                                      ex.groups, now))
        if len(calls) > 1 and any(c.priority != calls[0].priority or c.resumed for c in calls):
            # the batch is served as its requests would queue: resumed, then by
            # priority, then arrival; the outcomes go back in the calls' order
            outcomes: list[Outcome | Queued | None] = [None] * len(calls)
            for i in sorted(range(len(calls)), key=lambda i: (not calls[i].resumed,
                                                              calls[i].priority, calls[i].arrival)):
                outcomes[i] = self._submit(ex.holder, calls[i], now)
            return ExchangeReply(self.incarnation, tuple(outcomes))
        return ExchangeReply(self.incarnation,
                             tuple(self._submit(ex.holder, call, now) for call in calls))

    def take_resolved(self, holder: str) -> list[tuple[str, Outcome]]:
        """Outcomes of ``holder``'s queued requests decided since the last call."""
        self.leases.renew(holder, self._clock())
        return self._resolved.pop(holder, [])

    def has_resolved(self, holder: str) -> bool:
        return holder in self._resolved

    # -- replicas -----------------------------------------------------------------------
    def update_stats(self, stats: ReplicaStats) -> bool:
        """``RouterCore.update_stats``, then the model's queue gets a turn."""
        unknown = self.core.update_stats(stats)
        now = self._clock()
        if isinstance(stats, DecodeReplicaStats):
            self._pushed_at[stats.replica_id] = now
            if stats.healthy and not stats.draining:
                self._live_at[stats.model] = now
        self._blocked[stats.model] = None
        self._pump(stats.model, now)
        return unknown

    def remove_replica(self, replica_id: str) -> bool:
        self._note_live()
        self._pushed_at.pop(replica_id, None)
        return self.core.remove_replica(replica_id)

    def suspect(self, replica_id: str) -> bool:
        """``RouterCore.mark_suspect``: an RPC to the replica failed."""
        self._note_live()
        return self.core.mark_suspect(replica_id)

    def _note_live(self) -> None:
        """Before a replica leaves: a model live until now starts its grace now."""
        now = self._clock()
        for model in self._live_at:
            if self.core.has_live_decode(model):
                self._live_at[model] = now

    def tick(self) -> None:
        """Periodic: end the leases of silent holders, refuse queued requests
        past their deadline or of a model without replicas for too long."""
        now = self._clock()
        for holder in self.leases.expired_holders(now):
            for lease in self.leases.of_holder(holder):
                self._drop(lease, now, expired=True)
                self.counts["leases_expired"] += 1
            self._resolved.pop(holder, None)
        for model, q in self._queues.items():
            if q:
                self._pump(model, now)

    # -- views --------------------------------------------------------------------------
    def serves(self, model: str) -> bool:
        return model in self._queues

    def in_flight(self, model: str) -> int:
        return self.core.counters().in_flight.get(model, 0)

    def queued(self) -> dict[str, int]:
        return {m: len(q) for m, q in self._queues.items()}

    def oldest_wait_s(self) -> dict[str, float]:
        now = self._clock()
        return {m: q.oldest_wait_s(now) for m, q in self._queues.items()}

    def expected_output_tokens(self, model: str) -> int:
        return self.lengths.expected(model, 1 << 30)

    # -- internals ----------------------------------------------------------------------
    def _submit(self, holder: str, call: RouteCall, now: float) -> Outcome | Queued:
        req = call.request
        model = req.model
        q = self._queues.get(model)
        if q is None:
            return UnknownModelError(model, tuple(self._queues))
        lease = self.leases.get(call.lease_id)
        if lease is None:
            try:
                self.core.admit(model, force=call.admitted)
            except OverloadedError as e:
                self._count_refusal(model, OVERLOADED)
                return e
            lease = Lease(call.lease_id, holder, model, adopted=False)
            self.leases.add(lease, now)
        elif lease.queued:
            return QUEUED  # asked twice (moved back to this router): it already waits
        else:
            lease.adopted = False  # this router places it now (again)
            self._give_back(lease)
        expected = self.lengths.expected(model, req.max_tokens)
        if req.expected_output_tokens != expected:
            req = req.expecting(expected)
        if not q:  # nobody waits ahead of it: the common case, placed at once
            out = self._try_place(req, call.admitted or call.resumed, call.waiting_since, lease,
                                  now)
            if out is not None:
                return out
        never = self.core.never_fits(req)
        if never is not None:
            return self._refuse(lease, never, now)
        deadline = _INF if call.deadline is None else call.deadline
        bound = self.cfg.max_resume_wait_s if call.resumed else self.cfg.max_queue_delay_s
        if bound > 0:
            deadline = min(deadline, call.waiting_since + bound)
        admitted = call.admitted or call.resumed
        entry = Waiting(call.lease_id, holder, req, call.priority, call.arrival,
                        call.waiting_since, deadline, admitted, call.resumed, now)
        if q and entry.key < q.first_key():  # it goes first (resumed, a priority, an older retry)
            out = self._try_place(req, admitted, call.waiting_since, lease, now)
            if out is not None:
                return out
        if now >= deadline:
            return self._refuse(lease, self._timeout(entry, now), now)
        if self._model_down(model, now):
            return self._refuse(lease, self._no_replica(model, now), now)
        q.add(entry)
        lease.queued = True
        self.counts["queued"] += 1
        return QUEUED

    def _try_place(self, req: RouteRequest, admitted: bool, waiting_since: float, lease: Lease,
                   now: float) -> Outcome | None:
        """Place now: the placement, a refusal (the predicted wait cannot be
        met), or None (no replica can take it yet)."""
        try:
            p = self.core.route(req, shed=not admitted, waited_s=now - waiting_since)
        except QueueDelayError as e:
            return self._refuse(lease, e, now)
        except NoCapacityError:
            return None
        lease.decode_replica, lease.kv_tokens, lease.request_id = (p.decode_replica, req.kv_tokens,
                                                                   req.request_id)
        if self.on_placement is not None:
            self.on_placement(req.model, p.reason)
        return p

    def _pump(self, model: str, now: float) -> None:
        """Serve the model's queue from the front while replicas can take it."""
        q = self._queues[model]
        if not q:
            return
        down = self._model_down(model, now)
        blocked = self._blocked[model]
        for entry in q:
            lease = self.leases.get(entry.lease_id)
            if entry.deadline <= now:
                self._refuse(lease, self._timeout(entry, now), now)
                continue
            if down:
                self._refuse(lease, self._no_replica(model, now), now)
                continue
            if blocked is not None:
                continue  # only deadlines until capacity changes
            out = self._try_place(entry.request, entry.admitted, entry.waiting_since, lease, now)
            if out is None and entry.request.refused_by:
                out = self._back_to_refusers(entry, lease, now)
            if out is None:
                if not entry.request.exclude_replicas:
                    blocked = self._blocked[model] = entry.key
                continue
            if isinstance(out, Placement):
                q.remove(entry.lease_id)
                lease.queued = False
                self._resolved.setdefault(entry.holder, []).append((entry.lease_id, out))

    def _back_to_refusers(self, entry: Waiting, lease: Lease, now: float) -> Outcome | None:
        """No other replica could take ``entry``: the replicas that refused it
        for room and have pushed stats since it was queued (the router's view
        of their room is fresh now) may have it again, as any request."""
        req = entry.request
        fresh = frozenset(r for r in req.refused_by
                          if self._pushed_at.get(r, -_INF) > entry.queued_at)
        if not fresh:
            return None
        entry.request = req = msgspec.structs.replace(
            req, exclude_replicas=req.exclude_replicas - fresh, refused_by=req.refused_by - fresh)
        return self._try_place(req, entry.admitted, entry.waiting_since, lease, now)

    def _model_down(self, model: str, now: float) -> bool:
        if self.core.has_live_decode(model):
            self._live_at[model] = now
            return False
        return now - self._live_at[model] > self.cfg.no_replica_grace_s

    def _timeout(self, entry: Waiting, now: float) -> QueueTimeoutError:
        model = entry.request.model
        retry = self.core.retry_after_s(model)
        bound = (f"router.max_resume_wait_s {self.cfg.max_resume_wait_s:g} s for a resumed "
                 "stream" if entry.resumed else
                 f"router.max_queue_delay_s {self.cfg.max_queue_delay_s:g} s")
        return QueueTimeoutError(
            f"request {entry.request.request_id!r} waited {now - entry.waiting_since:.3f} s and "
            f"no replica of model {model!r} could take it before its deadline ({bound}, or the "
            f"request's own); retry after {retry:.3f} s", model, retry)

    def _no_replica(self, model: str, now: float) -> NoReplicaError:
        return NoReplicaError(
            f"model {model!r} has had no live decode replica for {now - self._live_at[model]:.1f} s "
            f"(router.no_replica_grace_s {self.cfg.no_replica_grace_s:g} s); its pool is "
            "down or still starting", model, self.cfg.retry_after_max_s)

    def _refuse(self, lease: Lease, err: RouteRefusal, now: float) -> RouteRefusal:
        """End ``lease`` with refusal ``err``; a queued request's outcome goes
        to its holder's resolved list, an immediate one is returned."""
        was_queued = lease.queued
        if was_queued:
            self._queues[lease.model].remove(lease.lease_id)
            self._resolved.setdefault(lease.holder, []).append((lease.lease_id, err))
        self.leases.end(lease.lease_id, now)
        self._give_back(lease)
        self.core.release(lease.model, finished=False)
        self._count_refusal(lease.model, refusal_reason(err))
        return err

    def _count_refusal(self, model: str, reason: str) -> None:
        self.refusals[reason] += 1
        if self.on_refusal is not None:
            self.on_refusal(model, reason)

    def _release(self, end: LeaseEnd, seen: str, now: float, touched: set[str]) -> None:
        lease = self.leases.end(end.lease_id, now, remember=False)
        if lease is None:
            # a slot that ended here without its release (expired, refused,
            # no longer listed) or that a previous incarnation held is not
            # an error; any other is a double release, counted and exported
            if (seen == self.incarnation and not end.elsewhere
                    and not self.leases.ended_recently(end.lease_id)):
                self.counts["unbalanced_releases"] += 1
            return
        if lease.queued:  # cancelled while waiting
            self._queues[lease.model].remove(lease.lease_id)
        finished = end.output_tokens >= 0
        if finished:
            self.lengths.observe(lease.model, end.output_tokens)
        self.core.release(lease.model, finished=finished)
        if self._give_back(lease):
            touched.add(lease.model)
            self._blocked[lease.model] = None

    def _give_back(self, lease: Lease) -> bool:
        """Return the KV room counted for the lease's placement, if any."""
        if lease.decode_replica is None:
            return False
        self.core.uncount(lease.model, lease.decode_replica, lease.kv_tokens, lease.request_id)
        lease.decode_replica = None
        return True

    def _drop(self, lease: Lease, now: float, expired: bool = False) -> None:
        """End a lease its holder did not release (it expired, or its holder
        no longer lists it)."""
        if lease.queued:
            self._queues[lease.model].remove(lease.lease_id)
        self.leases.end(lease.lease_id, now, may_return=expired)
        if self._give_back(lease):
            self._blocked[lease.model] = None
        self.core.release(lease.model, finished=False)

    def _reconcile(self, holder: str, live: Mapping[str, str], now: float,
                   touched: set[str]) -> None:
        for lease in self.leases.of_holder(holder):
            if lease.lease_id not in live:
                if lease.decode_replica is not None or lease.queued:
                    touched.add(lease.model)
                self._drop(lease, now)
                if not lease.adopted:
                    self.counts["leases_reclaimed"] += 1  # a slot its holder lost track of
        for lease_id, model in live.items():
            if (lease_id in self.leases or model not in self._queues
                    or not self.leases.may_adopt(lease_id)):
                continue
            self.core.admit(model, force=True)
            self.leases.add(Lease(lease_id, holder, model, adopted=True), now)
            self.counts["leases_adopted"] += 1
