"""Requests through the simulated cluster, stage by stage as deployed.

Ingress (``ClusterBackend.generate`` and its router client): one
``RouteCall`` to the router (``RouterService.exchange``) admits the request
(429 when the model holds ``max_queue_per_model``) and places it, or queues
it in the model's wait queue until a stats push or a release makes room
(refused past ``max_queue_delay_s``); a refusal before the first token places it again
elsewhere (``exclude``), a decode replica lost mid-stream resumes the
request elsewhere from the tokens produced so far, at most
``router.max_retries`` times. The admission slot (a lease) is released
at the end (``LeaseEnd``).

Decode replica (``DecodeWorker.generate``) with a prefill placement:
  Prealloc: ``KVCacheManager.reserve`` (refused when it does not fit)
  -> Transfer: the prefill replica runs the prompt (``PrefillWorker``:
     waiting -> chunked prefill steps -> first token), then its KV
     (prompt minus what the decode replica already caches) crosses the
     network; the prefill replica frees its blocks
  -> Commit: the reservation becomes a running sequence with the first
     token (``admit_imported``); decoding continues in the batch
Without a prefill placement (or when the prefill replica fails and
``on_prefill_failure`` is local) the prompt is prefilled on the decode
replica. Every RPC hop costs ``rpc_s``; tokens reach the client
``stream_s`` after they are produced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from splitserve.cluster.planning.sim import adapter
from splitserve.cluster.planning.sim.sequence import SimSequence, output_block_hash
from splitserve.router.exchange import Exchange, Queued
from splitserve.router.types import (NoReplicaError, OverloadedError, Placement, QueueDelayError,
                                     QueueTimeoutError)

if TYPE_CHECKING:
    from splitserve.cluster.planning.sim.pools import Slot
    from splitserve.cluster.planning.sim.replica import SimReplica
    from splitserve.cluster.planning.sim.simulator import Simulation


HOLDER = "sim-ingress"  # the ingress whose router client holds every lease
REFUSALS = {OverloadedError: "overloaded (router queue full)",
            QueueDelayError: "overloaded (queue delay)",
            QueueTimeoutError: "overloaded (queue timeout)", NoReplicaError: "no replica"}


class SimRequest:
    __slots__ = ("idx", "key", "model", "arrival", "prompt_len", "output_len", "hashes",
                 "produced", "attempt", "attempts_left", "exclude", "admitted", "first_token",
                 "last_token", "local", "retries", "decode", "prefill", "cached", "seq", "pseq",
                 "nbytes", "ended", "leased")

    def __init__(self, idx: int, model: str, arrival: float, prompt_len: int, output_len: int,
                 hashes: list[int], attempts: int):
        self.idx = idx
        self.key = idx
        self.model = model
        self.arrival = arrival
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.hashes = hashes  # full-block hashes of the prompt of the current attempt
        self.produced = 0  # output tokens delivered by earlier attempts
        self.attempt = 0
        self.attempts_left = attempts
        self.exclude: set[str] = set()
        self.admitted = False
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.local = False
        self.retries = 0
        self.decode: Slot | None = None
        self.prefill: Slot | None = None
        self.cached = 0
        self.seq: SimSequence | None = None
        self.pseq: SimSequence | None = None
        self.nbytes = 0
        self.ended = False
        self.leased = True  # its admission slot is held at the router (until refused)

    @property
    def seq_id(self) -> str:
        return f"r{self.idx}.{self.attempt}"


class Serving:
    def __init__(self, sim: "Simulation"):
        self.sim = sim
        self.loop = sim.loop
        self.service = sim.service
        self.opts = sim.opts
        self.in_flight = 0
        self.finished = 0
        self._waiting: dict[str, SimRequest] = {}  # lease id -> request queued at the router

    # -- ingress -------------------------------------------------------------------------
    def arrive(self, req: SimRequest) -> None:
        self.in_flight += 1
        self.loop.after(self.opts.rpc_s + self.sim.request_s.get(req.model, 0.0), self._route,
                        req)

    def _exchange(self, calls=(), releases=()) -> tuple:
        """One exchange of the ingress' router client (it renews its leases)."""
        return self.service.exchange(Exchange(HOLDER, self.service.incarnation, tuple(calls),
                                              tuple(releases))).outcomes

    def _route(self, req: SimRequest) -> None:
        """``RouteCall``: placed now, queued at the router, or refused."""
        if req.ended:
            return
        n = req.prompt_len + req.produced
        rr = adapter.route_request(f"r{req.idx}-{req.produced}-{req.attempts_left}", req.model,
                                   n, req.output_len - req.produced, req.hashes, req.exclude)
        lease = f"r{req.idx}"
        call = adapter.route_call(lease, rr, req.arrival, self.loop.now, req.admitted)
        (out,) = self._exchange(calls=(call,))
        req.admitted = req.admitted or not isinstance(out, OverloadedError)
        if isinstance(out, Queued):
            self._waiting[lease] = req
        else:
            self._outcome(req, out)
        self.resolve()

    def resolve(self) -> None:
        """Outcomes of queued requests the router decided (a stats push, a
        release or its tick made room, or a deadline passed): they reach the
        ingress one hop later (``RouterActor.poll``)."""
        if not self.service.has_resolved(HOLDER):
            return
        for lease, out in self.service.take_resolved(HOLDER):
            req = self._waiting.pop(lease, None)
            if req is not None:
                self.loop.after(self.opts.rpc_s, self._resolved, (req, out))

    def _resolved(self, arg) -> None:
        req, out = arg
        if not req.ended:
            self._outcome(req, out)

    def _outcome(self, req: SimRequest, out) -> None:
        if not isinstance(out, Placement):
            req.leased = False  # the router ended the lease with its refusal
            self._end(req, REFUSALS.get(type(out), "no capacity"))
            return
        slots = self.sim.replicas
        req.decode = slots[out.decode_replica]
        req.prefill = slots[out.prefill_replica] if out.prefill_replica else None
        req.decode.requests.add(req)
        self.loop.after(self.opts.rpc_s, self._at_decode, (req, req.attempt))

    def _retry(self, req: SimRequest, why: str) -> None:
        """A refusal or a lost replica: place again elsewhere (``ClusterBackend``)."""
        if req.ended:
            return
        if req.decode is not None:
            req.decode.requests.discard(req)
            req.exclude.add(req.decode.name)
        req.attempts_left -= 1
        if req.attempts_left <= 0:
            self._end(req, why)
            return
        req.attempt += 1
        req.retries += 1
        req.seq = req.pseq = None
        self.loop.after(self.opts.rpc_s, self._route, req)

    # -- decode replica: Generate ------------------------------------------------------------
    def _at_decode(self, arg) -> None:
        req, attempt = arg
        if attempt != req.attempt or req.ended:
            return
        d = req.decode
        if d.rep is None or not d.rep.alive:
            self._retry(req, "decode replica unavailable")
            return
        if req.prefill is not None:
            d.rep.call(lambda: self._reserve(req, attempt))
        else:
            d.rep.call(lambda: self._add_local(req, attempt))

    def _new_seq(self, req: SimRequest, target: int, prefill_only: bool = False) -> SimSequence:
        n = req.prompt_len + req.produced
        seq = SimSequence(req.seq_id, n, req.hashes, self.sim.block_size(req.model), req.key,
                          target, req.arrival, prefill_only)
        seq.owner = req
        return seq

    def _add_local(self, req: SimRequest, attempt: int) -> None:
        if attempt != req.attempt or req.ended:
            return
        req.local = req.produced == 0 or req.local
        seq = self._new_seq(req, req.output_len - req.produced)
        req.seq = seq
        req.decode.rep.sched.add(seq)

    def _reserve(self, req: SimRequest, attempt: int) -> None:
        """``Reservations.reserve`` on the decode replica's engine."""
        if attempt != req.attempt or req.ended:
            return
        rep = req.decode.rep
        kv = rep.kv
        n = req.prompt_len + req.produced
        need_total = n + (req.output_len - req.produced)
        got = None
        if kv.blocks_for(need_total) <= kv.num_blocks:
            got = kv.reserve(req.seq_id, req.hashes[: n // kv.block_size], n)
        if got is None:
            self._retry(req, "decode replica out of KV blocks")
            return
        rep.reservations += 1
        req.cached = got[1]
        self.loop.after(self.opts.rpc_s, self._at_prefill, (req, attempt))

    def _cancel_reservation(self, req: SimRequest) -> None:
        rep = req.decode.rep
        if rep is not None and rep.alive:
            def cancel():
                rep.kv.free(req.seq_id)
                rep.reservations -= 1
            rep.call(cancel)

    # -- prefill replica: Prefill ---------------------------------------------------------
    def _at_prefill(self, arg) -> None:
        req, attempt = arg
        if attempt != req.attempt or req.ended:
            return
        p = req.prefill
        if p.rep is None or not p.rep.alive:
            self._prefill_failed(req)
            return
        p.requests.add(req)
        seq = self._new_seq(req, 1, prefill_only=True)
        req.pseq = seq
        p.rep.inflight += 1
        p.rep.call(lambda: p.rep.sched.add(seq))

    def on_prefill_done(self, rep: "SimReplica", seq: SimSequence) -> None:
        req = seq.owner
        if req.pseq is not seq or req.ended:  # a superseded attempt: free and forget
            rep.call(lambda: rep.kv.free(seq.seq_id))
            rep.inflight -= 1
            return
        n = req.prompt_len + req.produced
        nbytes = (n - req.cached) * self.sim.kv_bytes(req.model) + self.sim.state_bytes(req.model)
        req.nbytes = nbytes
        rep.bytes_sent += nbytes
        attempt = req.attempt
        self.sim.network.transfer(rep.node_id, req.decode.rep.node_id, nbytes,
                                  lambda: self._transferred(req, rep, seq, attempt))

    def _transferred(self, req: SimRequest, rep: "SimReplica", seq: SimSequence,
                     attempt: int) -> None:
        if rep.alive:
            rep.call(lambda: rep.kv.free(seq.seq_id))  # engine.release after the acks
            rep.inflight -= 1
        if req.prefill is not None:
            req.prefill.requests.discard(req)
        if attempt != req.attempt or req.ended or req.pseq is not seq:
            return  # superseded, or the sender died mid-transfer (fell back already)
        self.loop.after(self.opts.rpc_s, self._commit_rpc, (req, attempt))

    def _commit_rpc(self, arg) -> None:
        req, attempt = arg
        if attempt != req.attempt or req.ended:
            return
        d = req.decode.rep
        if d is None or not d.alive:
            return  # its stream already failed (replica_lost)
        d.call(lambda: self._commit(req, attempt))

    def _commit(self, req: SimRequest, attempt: int) -> None:
        """``admit_imported``: the reservation becomes a running sequence."""
        if attempt != req.attempt or req.ended:
            return
        rep = req.decode.rep
        rep.reservations -= 1
        rep.handoffs += 1
        rep.handoff_bytes += req.nbytes
        n = req.prompt_len + req.produced
        seq = self._new_seq(req, req.output_len - req.produced)
        seq.num_cached_tokens = req.cached
        req.seq = seq
        rep.admit_imported(seq, n)  # with the first token, sampled by the prefill replica

    def _prefill_failed(self, req: SimRequest) -> None:
        """The Prefill RPC failed: cancel the reservation, then (``local``)
        prefill on the decode replica, or fail."""
        self._cancel_reservation(req)
        if req.prefill is not None:
            req.prefill.requests.discard(req)
        if self.sim.cfg.transfer.on_prefill_failure == "error":
            self._end(req, "prefill replica failed")
            return
        req.prefill = None
        req.pseq = None
        d = req.decode.rep
        attempt = req.attempt
        d.call(lambda: self._add_local(req, attempt))

    # -- replica hooks -----------------------------------------------------------------------
    def on_first_token(self, rep: "SimReplica", seq: SimSequence) -> None:
        req = seq.owner
        if req.first_token is None:
            req.first_token = self.loop.now + self.opts.stream_s

    def on_finished(self, rep: "SimReplica", seq: SimSequence) -> None:
        req = seq.owner
        if req.seq is not seq or req.ended:
            return
        req.produced += seq.num_output_tokens
        req.last_token = self.loop.now + self.opts.stream_s
        if req.first_token is None:
            req.first_token = req.last_token
        self._end(req, None)

    def replica_lost(self, slot: "Slot", held: list[SimSequence]) -> None:
        """``slot``'s replica died (or was stopped busy): every request with
        work there fails over as the cluster's clients and workers do."""
        now = self.loop.now
        for req in sorted(slot.requests, key=lambda r: r.idx):
            if req.ended:
                continue
            if req.prefill is slot and req.decode is not slot:
                self._prefill_failed(req)  # the decode side falls back
                continue
            seq = req.seq
            if seq is not None and seq.owner is req:
                made = slot.rep.produced_at(seq, now) if seq.num_output_tokens or seq.done else 0
                if made:
                    self._resume(req, made)
                    continue
            self._retry(req, "decode replica lost")
        slot.requests.clear()

    def _resume(self, req: SimRequest, made: int) -> None:
        """Tokens were streamed: continue from prompt + output elsewhere."""
        bs = self.sim.block_size(req.model)
        req.produced += made
        n = req.prompt_len + req.produced
        hashes = req.hashes
        while len(hashes) < n // bs:
            hashes.append(output_block_hash(hashes[-1] if hashes else 0, req.key, len(hashes)))
        if req.produced >= req.output_len:
            req.last_token = self.loop.now
            self._end(req, None)
            return
        self._retry(req, "decode replica lost after streaming")

    # -- end ---------------------------------------------------------------------------------
    def _end(self, req: SimRequest, error: str | None) -> None:
        if req.ended:
            return
        req.ended = True
        self.in_flight -= 1
        self.finished += 1
        if req.decode is not None:
            req.decode.requests.discard(req)
        lease = f"r{req.idx}"
        self._waiting.pop(lease, None)
        if req.admitted and req.leased:
            self._exchange(releases=(adapter.lease_end(lease, req.produced if error is None
                                                       else None),))
            self.resolve()
        total = req.produced if error is None else 0
        self.sim.log.add(req.arrival, req.prompt_len, req.output_len, req.first_token,
                         req.last_token, total, req.local, req.retries, error)
        # its sequences point back at it (``owner``): cut the cycle so an ended
        # request is freed at once, without the cyclic garbage collector
        req.seq = req.pseq = None
