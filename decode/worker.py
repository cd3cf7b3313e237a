"""DecodeWorker: the target half of the KV hand-off, and the running batch.

One Generate call (``GenerateRequest``, from the ingress with the router's
placement) takes one of two paths to its first token, then streams
``GenerateOutput`` until a stop condition:

  _remote (a prefill placement): an ``IncomingHandoff`` moving through
      ``DecodeStage``: RESERVED -> RECEIVING -> COMMITTED -> RUNNING
      (``splitserve.decode.handoff``: reserve blocks with a lease, have the
      prefill replica run the prompt into them, admit the sequence, stream)
  _local (no placement, the hand-off failed under the ``local`` policy, or
      this replica takes no hand-off: a hybrid model's recurrent states split
      across its tensor-parallel ranks): the prompt is prefilled here, in the
      running batch

A refused reservation fails the call (RESOURCE_EXHAUSTED: the ingress tries
another replica). A failed Prefill call cancels the reservation (CANCELLED)
and falls back to ``_local``, or fails the call under the ``error`` policy;
one that failed because the request made the prefill engine raise
(RequestFailedError) fails the call under either policy. A request this
engine fails alone ends its stream with REQUEST_FAILED; a stopped engine
ends every stream with ENGINE_DEAD (``splitserve.handoff.rpc_errors``).
Cancelling the call at any point cancels the Prefill call, the reservation
and the sequence; ``_sweep`` frees reservations whose lease ran out.

Traced (a ``Tracer`` given and the request carrying a traceparent): the call
is a ``decode`` span (child of the ingress request's span) marking its first
token and ending with the stream, and the remote path a ``handoff.receive``
span under it (reserved, received, committed), whose traceparent the
Prefill call carries; failures and fallbacks are recorded on them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from splitserve.decode.handoff import IncomingHandoff
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.errors import (EngineDeadError, IncompatibleKVError, InvalidRequestError,
                                      RequestFailedError)
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.stats import DecodeStats
from splitserve.engine.kv_port import AdapterRef
from splitserve.handoff.messages import (Adapter, GenerateOutput, GenerateRequest,
                                         GenerateTimings, PrefillMode, PrefillReply)
from splitserve.handoff.protocol import Reservations, check_state_fits
from splitserve.handoff.rpc import RpcError, WorkerClients
from splitserve.handoff.tls import TLSConfig
from splitserve.handoff.tracing import (ATTR_BYTES, ATTR_CACHED_TOKENS, ATTR_FINISH_REASON,
                                        ATTR_OUTPUT_TOKENS, ATTR_PREFILL_MODE,
                                        ATTR_PREFILL_REPLICA, ATTR_PROMPT_TOKENS, ATTR_REQUEST_ID,
                                        SPAN_DECODE, SPAN_HANDOFF_RECEIVE, Span, Tracer)
from splitserve.handoff.transfer.base import KVReceiver

log = logging.getLogger("splitserve.decode")
FALLBACK_POLICIES = ("local", "error")


@dataclass
class _FirstToken:
    """How a request's first token came about (GenerateTimings, once known)."""

    started: float
    mode: PrefillMode = PrefillMode.LOCAL
    fallback_reason: str | None = None
    handoff_s: float | None = None
    prefill: PrefillReply | None = None

    def timings(self, first: RequestOutput) -> GenerateTimings:
        t = GenerateTimings(mode=self.mode, ttft_s=time.monotonic() - self.started,
                            fallback_reason=self.fallback_reason)
        if self.mode is PrefillMode.LOCAL:
            t.local_queue_s = first.queue_s()
        elif self.prefill is not None:
            p = self.prefill.timings
            t.handoff_s = self.handoff_s
            t.prefill_s, t.prefill_queue_s = p.prefill_s, p.prefill_queue_s
            t.transfer_wait_s, t.bytes = p.transfer_wait_s, p.bytes
        return t


def _output(out: RequestOutput, timings: GenerateTimings | None,
            cached_tokens: int | None) -> GenerateOutput:
    """``out`` in wire form, reporting ``cached_tokens`` (when given) as the
    prompt's cached tokens."""
    g = GenerateOutput.of(out, timings)
    if cached_tokens is not None:
        g.cached_tokens = cached_tokens
    return g


def _finished(span: Span, out: RequestOutput) -> None:
    span.set(ATTR_OUTPUT_TOKENS, out.num_output_tokens)
    reason = out.finish_reason
    if reason is not None:  # a FinishReason (a str enum) or its value
        span.set(ATTR_FINISH_REASON, [getattr(reason, "value", reason)])


def _end_with(span: Span, error: BaseException) -> None:
    """A span's call ended by ``error``: a cancellation (the caller went
    away) is marked as such, anything else recorded as a failure."""
    if isinstance(error, (GeneratorExit, asyncio.CancelledError)):
        span.set("splitserve.cancelled", True)
    else:
        span.fail(error)


class DecodeWorker:
    def __init__(self, engine: LLMEngine, receiver: KVReceiver, token: str,
                 on_prefill_failure: str = "local", lease_s: float = 30.0,
                 prefill_timeout_s: float = 60.0, sweep_s: float = 0.5,
                 tls: TLSConfig | None = None, tracer: Tracer | None = None):
        if on_prefill_failure not in FALLBACK_POLICIES:
            raise ValueError(f"on_prefill_failure must be one of {FALLBACK_POLICIES}")
        self.engine = engine
        self.tracer = tracer
        self.receiver = receiver
        self.on_prefill_failure = on_prefill_failure
        self.prefill_timeout_s = prefill_timeout_s
        self.sweep_s = sweep_s
        self.reservations = Reservations(engine.kv_port, lease_s)
        self.aengine = AsyncEngine(engine, name="decode-engine")
        self.kv_endpoint = ""
        self._clients = WorkerClients(token, tls)  # to prefill replicas
        self._sweeper: asyncio.Task | None = None
        self.draining = False
        self.counters = {"handoffs": 0, "local_prefills": 0, "fallbacks": 0, "refused": 0,
                         "expired": 0, "handoff_bytes": 0}
        # why this replica takes no hand-off (a hybrid model's recurrent states too
        # large for a reply), or None: it then
        # prefills every prompt itself, whatever its placement says
        self.no_handoffs: str | None = None
        try:
            check_state_fits(engine.kv_port)
        except IncompatibleKVError as e:
            self.no_handoffs = str(e)
            log.warning("this decode replica prefills every prompt itself: %s", e)

    def start(self) -> "DecodeWorker":
        self.kv_endpoint = self.receiver.start(self.reservations)
        self.aengine.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return self

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        self.receiver.stop()
        self.aengine.stop()
        await self._clients.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                dead = await self.aengine.call(lambda e: self.reservations.expire())
            except EngineDeadError:  # nothing left to sweep: its blocks are gone with it
                return
            self.counters["expired"] += len(dead)

    # -- RPC ----------------------------------------------------------------
    def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """The Generate stream; untraced, the stream itself (no extra layer)."""
        if self.tracer is None or req.traceparent is None:
            return self._generate(req, None)
        return self._traced_generate(req)

    async def _traced_generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        span = self.tracer.start(SPAN_DECODE, req.traceparent, server=True, attributes={
            ATTR_REQUEST_ID: req.request_id, ATTR_PROMPT_TOKENS: len(req.prompt_token_ids)})
        try:
            async for out in self._generate(req, span):
                yield out
        except BaseException as e:
            _end_with(span, e)
            raise
        finally:
            span.end()

    async def _generate(self, req: GenerateRequest,
                        span: Span | None) -> AsyncIterator[GenerateOutput]:
        if not req.request_id:
            raise InvalidRequestError("request_id is empty", param="request_id")
        rid, ids = req.request_id, list(req.prompt_token_ids)
        params = SamplingParams.from_dict(req.params)
        adapter = Adapter.to_engine(req.adapter)
        # the engine's fixed limits only: checked here, not after a trip to the
        # engine thread, which waits for the running step to end
        self.engine.validate(ids, params)
        # an adapter this replica has not seen is read from its path now, off
        # the engine thread; one it cannot read refuses the call here
        # (ADAPTER_UNAVAILABLE), before any block is reserved
        await self.aengine.load_adapter(adapter)
        first = _FirstToken(time.monotonic())
        handoff, stream = None, None
        if req.prefill is not None and self.no_handoffs is not None:
            self.counters["fallbacks"] += 1  # a prefill placement this replica cannot take
            first.fallback_reason = self.no_handoffs[:200]
        elif req.prefill is not None:
            handoff, stream = await self._remote(rid, ids, params, req.prefill.address, first,
                                                 span, adapter)
        if stream is None:
            stream = self._local(rid, ids, params, adapter)
        # usage's cached prompt tokens: the engine here counts only its own
        # hits; a prompt prefilled remotely also took the prefill replica's
        cached = handoff.prompt_cached_tokens if handoff is not None else None
        timings: GenerateTimings | None = None
        async for out in stream:
            if timings is not None:
                if span is not None and out.finished:
                    _finished(span, out)
                yield _output(out, None, cached)
                continue
            if handoff is not None:
                handoff.running()
            timings = first.timings(out)
            if span is not None:
                span.set(ATTR_PREFILL_MODE, timings.mode.value)
                span.event("first_token", ttft_s=timings.ttft_s)
                if out.finished:
                    _finished(span, out)
            yield _output(out, timings, cached)

    # -- the two paths to the first token -----------------------------------------
    def _local(self, rid: str, ids: list[int], params: SamplingParams,
               adapter: AdapterRef | None = None):
        self.counters["local_prefills"] += 1
        return self.aengine.generate(rid, ids, params, adapter=adapter)

    async def _remote(self, rid: str, ids: list[int], params: SamplingParams, address: str,
                      first: _FirstToken, parent: Span | None = None,
                      adapter: AdapterRef | None = None,
                      ) -> tuple[IncomingHandoff | None, AsyncIterator | None]:
        """An IncomingHandoff through its stages up to Committed. Returns it
        and the committed sequence's stream, or (None, None) to prefill
        locally (the hand-off failed and was cancelled)."""
        span = None if parent is None else self.tracer.start(
            SPAN_HANDOFF_RECEIVE, parent.traceparent, attributes={ATTR_PREFILL_REPLICA: address})
        try:
            return await self._handoff(rid, ids, params, address, first, span, adapter)
        except BaseException as e:
            if span is not None:
                _end_with(span, e)
            raise
        finally:
            if span is not None:
                span.end()

    async def _handoff(self, rid: str, ids: list[int], params: SamplingParams, address: str,
                       first: _FirstToken, span: Span | None,
                       adapter: AdapterRef | None = None,
                       ) -> tuple[IncomingHandoff | None, AsyncIterator | None]:
        h = IncomingHandoff(self.aengine, self.reservations, rid, ids, params, adapter)
        try:
            await h.reserve()
        except Exception:
            self.counters["refused"] += 1
            raise
        if span is not None:
            span.event("reserved", cached_tokens=h.cached_tokens)
            span.set(ATTR_CACHED_TOKENS, h.cached_tokens)
        try:
            reply = await h.receive(self._clients.get(address), self.kv_endpoint,
                                    self.prefill_timeout_s,
                                    None if span is None else span.traceparent)
        except RequestFailedError:  # the request broke the prefill engine: not again here
            await h.cancel()
            raise
        except (RpcError, asyncio.TimeoutError) as e:
            await h.cancel()
            if self.on_prefill_failure == "error":
                raise
            self.counters["fallbacks"] += 1
            first.fallback_reason = str(e)[:200]
            if span is not None:  # the request goes on, prefilled here
                span.fail(e)
                span.set("splitserve.fallback", "local")
            return None, None
        except BaseException:  # cancelled by the client
            await h.cancel()
            raise
        first.mode, first.handoff_s, first.prefill = PrefillMode.REMOTE, h.handoff_s, reply
        self.counters["handoffs"] += 1
        self.counters["handoff_bytes"] += reply.timings.bytes
        if span is not None:
            span.set(ATTR_BYTES, reply.timings.bytes)
            span.event("received", handoff_s=h.handoff_s,
                       prefill_cached_tokens=h.prefill_cached_tokens)
        try:
            stream = await h.commit(reply)
        except BaseException:
            await h.cancel()
            raise
        if span is not None:
            span.event("committed")
        return h, stream

    async def stats(self, _req: dict | None = None) -> DecodeStats:
        load, reservations = await self.aengine.call(
            lambda e: (e.load_stats(), len(self.reservations)))
        c = self.counters
        return DecodeStats(engine=load, streams=self.aengine.num_streams,
                           reservations=reservations, handoffs=c["handoffs"],
                           local_prefills=c["local_prefills"], fallbacks=c["fallbacks"],
                           refused=c["refused"], expired=c["expired"],
                           handoff_bytes=c["handoff_bytes"], kv_endpoint=self.kv_endpoint)
