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
  _reply     describes the sequence (``HandoffMeta``) and the timings
  _release   frees its blocks: after the reply, or on any failure, cancel
             or deadline                                        -> RELEASED

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
from splitserve.handoff.protocol import export_meta, layout_of
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
    prefilled: bool = False  # the engine finished it: its blocks are held for us
    started: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_wait_s: float = 0.0


class PrefillWorker:
    def __init__(self, engine: LLMEngine, sender: KVSender, layer_group_size: int = 0,
                 transfer_timeout_s: float = 30.0):
        self.engine = engine
        self.port = engine.kv_port
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
        h = self._accept(req)
        try:
            await self._run(h, req)
            await self._transfer(h)
            reply = await self._reply(h)
            self.completed += 1
            self.bytes_sent += h.bytes_sent
            return reply
        except BaseException:
            self.failed += 1
            for f in h.sends:
                f.cancel()
            raise
        finally:
            await self._release(h)

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
        h.prefill_s = time.monotonic() - h.started

    async def _transfer(self, h: OutgoingHandoff) -> None:
        """TRANSFERRING: wait for every chunk's ack."""
        t0 = time.monotonic()
        await asyncio.gather(*h.sends)
        h.transfer_wait_s = time.monotonic() - t0

    async def _reply(self, h: OutgoingHandoff) -> PrefillReply:
        meta = await self.aengine.call(lambda e: export_meta(self.port, h.request_id))
        return PrefillReply(meta=meta, timings=PrefillTimings(
            prefill_s=h.prefill_s, prefill_queue_s=h.queue_s,
            transfer_wait_s=h.transfer_wait_s, bytes=h.bytes_sent))

    async def _release(self, h: OutgoingHandoff) -> None:
        """-> RELEASED: free the held blocks (or abort a request still running)."""
        self._handoffs.pop(h.request_id, None)
        h.stage = PrefillStage.RELEASED
        rid = h.request_id
        try:
            await self.aengine.call(
                lambda e: self.port.release(rid) if h.prefilled else e.abort(rid))
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
        h.bytes_sent += header.nbytes
        h.sends.append(asyncio.ensure_future(
            self.sender.send(h.endpoint, header, buf, h.timeout_s)))

    async def stats(self, _req: dict | None = None) -> PrefillStats:
        load = await self.aengine.call(lambda e: e.load_stats())
        return PrefillStats(engine=load, streams=self.aengine.num_streams,
                            inflight=len(self._handoffs), completed=self.completed,
                            failed=self.failed, bytes_sent=self.bytes_sent)
