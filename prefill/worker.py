"""PrefillWorker: the source half of the KV hand-off.

One Prefill call (``PrefillRequest``, from a decode replica that already
reserved blocks) is one ``OutgoingHandoff`` moving through ``PrefillStage``;
``PrefillWorker.prefill`` runs one method per step:

  _accept    the target's KV layout must equal ours, else FAILED_PRECONDITION
             before any work                                     -> WAITING
  _run       queued in the engine as a prefill-only request (with its LoRA
             adapter, read from its path if new here), batched and
             chunked with other prompts under the step token budget; the
             engine thread (``_layer_listener``) marks the first step that
             runs it                                             -> RUNNING
             and, in the step that runs its last chunk, packs each finished
             layer group and starts its send at once, so early layers travel
             while later ones compute                       -> TRANSFERRING
             until the first token is sampled
  _transfer  waits for every chunk's ack
  _reply     describes the sequence (``HandoffMeta``), the timings and the
             prompt tokens this engine's prefix cache spared it, and frees
             its blocks in the same engine-thread call
  _release   frees its blocks on any failure, cancel or deadline -> RELEASED

Traced (a ``Tracer`` given and the request carrying a traceparent): the
call is a ``prefill`` span, child of the decode replica's hand-off span,
with the KV transfer as its ``handoff.send`` child (first chunk sent to
last ack); failures are recorded on them.

Nothing here imports Ray; the Serve deployment in ``cluster`` wraps it.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.errors import EngineDeadError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledSeq
from splitserve.engine.stats import PrefillStats
from splitserve.handoff.messages import Adapter, PrefillReply, PrefillRequest, PrefillTimings
from splitserve.handoff.protocol import (check_state_fits, export_meta, layout_of, state_chunk,
                                         states_by_chunk)
from splitserve.handoff.tracing import (ATTR_BYTES, ATTR_CACHED_TOKENS, ATTR_PROMPT_TOKENS,
                                        ATTR_REQUEST_ID, SPAN_HANDOFF_SEND, SPAN_PREFILL, Span,
                                        Tracer)
from splitserve.handoff.transfer.base import KVSender, make_header


class PrefillStage(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    TRANSFERRING = "transferring"
    RELEASED = "released"


@dataclass
class OutgoingHandoff:
    """One Prefill call's state, from ``accept`` to ``release``."""

    request_id: str
    endpoint: str
    skip_tokens: int
    loop: asyncio.AbstractEventLoop
    timeout_s: float
    stage: PrefillStage = PrefillStage.WAITING
    sends: list[asyncio.Future] = field(default_factory=list)
    bytes_sent: int = 0
    first_send_ns: int = 0  # time.time_ns() of the first chunk sent (a span's start)
    prefilled: bool = False  # the engine finished it: its blocks are held for us
    released: bool = False  # its blocks were freed (with the reply)
    cached_tokens: int = 0  # prompt tokens the engine reused from its prefix cache
    started: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_wait_s: float = 0.0


class PrefillWorker:
    def __init__(self, engine: LLMEngine, sender: KVSender, layer_group_size: int = 0,
                 transfer_timeout_s: float = 30.0, tracer: Tracer | None = None):
        self.engine = engine
        self.tracer = tracer
        self.port = engine.kv_port
        check_state_fits(self.port)  # a model's states without KV layers ride in the reply
        # a hybrid model with attention layers sends its states as one more chunk
        self.states_by_chunk = states_by_chunk(self.port)
        self.sender = sender
        self.num_layers = self.port.spec().num_layers
        self.group = layer_group_size if 0 < layer_group_size < self.num_layers else self.num_layers
        self.transfer_timeout_s = transfer_timeout_s
        self.layout = layout_of(self.port)
        self.aengine = AsyncEngine(engine, name="prefill-engine")
        self.aengine.layer_listener = self._layer_listener
        self._handoffs: dict[str, OutgoingHandoff] = {}  # from accept to release
        self.completed = 0
        self.failed = 0
        self.bytes_sent = 0

    def start(self) -> "PrefillWorker":
        self.aengine.start()
        return self

    async def stop(self) -> None:
        self.aengine.stop()
        await self.sender.close()

    # -- RPC --------------------------------------------------------------------
    async def prefill(self, req: PrefillRequest) -> PrefillReply:
        """Run one prompt and transfer its KV into the target's reservation."""
        span = None
        if self.tracer is not None and req.traceparent is not None:
            span = self.tracer.start(SPAN_PREFILL, req.traceparent, server=True, attributes={
                ATTR_REQUEST_ID: req.request_id, ATTR_PROMPT_TOKENS: len(req.prompt_token_ids),
                ATTR_CACHED_TOKENS: req.target.skip_tokens})
        try:
            h = self._accept(req)
        except BaseException as e:
            if span is not None:
                span.fail(e)
                span.end()
            raise
        try:
            await self._run(h, req)
            if self.states_by_chunk:
                await self._send_states(h)
            if span is not None:
                span.event("first_token", prefill_s=h.prefill_s, queue_s=h.queue_s,
                           cached_tokens=h.cached_tokens)
            await self._transfer(h, span)
            reply = await self._reply(h)
            self.completed += 1
            self.bytes_sent += h.bytes_sent
            return reply
        except BaseException as e:
            self.failed += 1
            for f in h.sends:
                f.cancel()
            if span is not None:
                span.fail(e)
            raise
        finally:
            await self._release(h)
            if span is not None:
                span.set(ATTR_BYTES, h.bytes_sent)
                span.end()

    # -- stages -----------------------------------------------------------------
    def _accept(self, req: PrefillRequest) -> OutgoingHandoff:
        """Handshake; -> WAITING."""
        self.layout.check_compatible(req.target.layout)
        h = OutgoingHandoff(req.request_id, req.target.endpoint, req.target.skip_tokens,
                            asyncio.get_running_loop(), self.transfer_timeout_s)
        self._handoffs[h.request_id] = h
        return h

    async def _run(self, h: OutgoingHandoff, req: PrefillRequest) -> None:
        """WAITING -> RUNNING -> TRANSFERRING, until the first token."""
        params = SamplingParams.from_dict(req.params)
        async for out in self.aengine.generate(h.request_id, list(req.prompt_token_ids), params,
                                               prefill_only=True,
                                               adapter=Adapter.to_engine(req.adapter)):
            h.prefilled = out.finished
            h.queue_s = out.queue_s()
            h.cached_tokens = out.num_cached_tokens
        h.prefill_s = time.monotonic() - h.started

    async def _transfer(self, h: OutgoingHandoff, parent: Span | None = None) -> None:
        """TRANSFERRING: wait for every chunk's ack."""
        t0 = time.monotonic()
        try:
            await asyncio.gather(*h.sends)
        except BaseException as e:
            if parent is not None:
                self._send_span(h, parent, e)
            raise
        h.transfer_wait_s = time.monotonic() - t0
        if parent is not None:
            self._send_span(h, parent, None)

    def _send_span(self, h: OutgoingHandoff, parent: Span, error: BaseException | None) -> None:
        """Record ``h``'s ``handoff.send`` span: from its first chunk until now."""
        span = self.tracer.start(SPAN_HANDOFF_SEND, parent.traceparent,
                                 start_ns=h.first_send_ns or None, attributes={
                                     ATTR_BYTES: h.bytes_sent, "splitserve.chunks": len(h.sends),
                                     "splitserve.kv_endpoint": h.endpoint})
        if error is not None:
            span.fail(error)
        span.end()

    async def _reply(self, h: OutgoingHandoff) -> PrefillReply:
        """The sequence's description; its blocks are freed in the same trip
        to the engine thread (each trip waits for the running step to end)."""
        def meta_then_release(_engine):
            meta = export_meta(self.port, h.request_id, with_states=not self.states_by_chunk)
            h.released = True  # _release has nothing left to free, even if this raises
            self.port.release(h.request_id)
            return meta

        meta = await self.aengine.call(meta_then_release)
        return PrefillReply(meta=meta, timings=PrefillTimings(
            prefill_s=h.prefill_s, prefill_queue_s=h.queue_s,
            transfer_wait_s=h.transfer_wait_s, bytes=h.bytes_sent),
            cached_tokens=h.cached_tokens)

    async def _send_states(self, h: OutgoingHandoff) -> None:
        """The prefilled sequence's recurrent states, as the chunk past its
        last KV layer (taken on the engine thread once the prompt's last
        step has run every layer)."""
        buf = await self.aengine.call(lambda _engine: state_chunk(self.port, h.request_id))
        self._send(h, self.num_layers, self.num_layers + 1, buf)

    async def _release(self, h: OutgoingHandoff) -> None:
        """-> RELEASED: free the held blocks (or abort a request still running)."""
        self._handoffs.pop(h.request_id, None)
        h.stage = PrefillStage.RELEASED
        rid = h.request_id
        if h.released:  # with the reply
            return

        def release(e) -> None:
            # checked on the engine thread: a reply's call cancelled while queued still
            # runs there, before this one
            if h.released:
                return
            if h.prefilled:
                self.port.release(rid)
            else:
                e.abort(rid)

        try:
            await self.aengine.call(release)
        except EngineDeadError:  # its blocks went with the engine
            pass

    # -- engine thread: RUNNING, and TRANSFERRING as layer groups finish ---------
    def _layer_listener(self, scheduled: list[ScheduledSeq]):
        ready = []
        for s in scheduled:
            h = self._handoffs.get(s.seq.seq_id)
            if h is None:
                continue
            h.stage = PrefillStage.RUNNING
            if s.completes:
                h.stage = PrefillStage.TRANSFERRING
                ready.append(h)
        if not ready:
            return None
        group, total = self.group, self.num_layers

        def on_layer_done(layer: int) -> None:
            end = layer + 1
            if end % group and end != total:
                return
            start = (end - 1) // group * group
            for h in ready:
                buf = self.port.export_layers(h.request_id, start, end, h.skip_tokens)
                h.loop.call_soon_threadsafe(self._send, h, start, end, buf)

        return on_layer_done

    def _send(self, h: OutgoingHandoff, start: int, end: int, buf) -> None:
        header = make_header(h.request_id, start, end, buf)
        if not h.sends:
            h.first_send_ns = time.time_ns()
        h.bytes_sent += header.nbytes
        h.sends.append(asyncio.ensure_future(
            self.sender.send(h.endpoint, header, buf, h.timeout_s)))

    async def stats(self, _req: dict | None = None) -> PrefillStats:
        load = await self.aengine.call(lambda e: e.load_stats())
        return PrefillStats(engine=load, streams=self.aengine.num_streams,
                            inflight=len(self._handoffs), completed=self.completed,
                            failed=self.failed, bytes_sent=self.bytes_sent)
