"""PrefillWorker: computes prompts' KV and hands it to decode replicas.

Request lifecycle and queues:

  Prefill RPC (from a decode replica, which already reserved blocks)
    -> handshake: the decode side's KV layout must equal ours, else
       FAILED_PRECONDITION before any work
    -> Waiting: queued in the engine as a prefill-only request, batched and
       chunked with other prompts under the step token budget
    -> Inflight: during the step that runs the prompt's last chunk, each
       finished layer group is packed into one buffer and sent at once, so
       early layers travel while later ones compute
    -> the first token is sampled; the RPC waits for every chunk's ack
    -> reply with the hand-off metadata (prompt, first token, params)
    -> blocks released (also on any failure, cancel or deadline)

Nothing here imports Ray; the Serve deployment in ``cluster`` wraps it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from splitserve.engine.async_engine import AsyncEngine
from splitserve.handoff.protocol import engine_layout, export_layers, export_meta
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledSeq
from splitserve.engine.stats import PrefillStats
from splitserve.handoff.transfer.base import KVLayout, KVSender, make_header


@dataclass
class _Handoff:
    request_id: str
    endpoint: str
    skip_tokens: int
    loop: asyncio.AbstractEventLoop
    timeout_s: float
    sends: list[asyncio.Future] = field(default_factory=list)
    bytes_sent: int = 0


class PrefillWorker:
    def __init__(self, engine: LLMEngine, sender: KVSender, layer_group_size: int = 0,
                 transfer_timeout_s: float = 30.0):
        self.engine = engine
        self.sender = sender
        self.num_layers = engine.model_cfg.num_layers
        self.group = layer_group_size if 0 < layer_group_size < self.num_layers else self.num_layers
        self.transfer_timeout_s = transfer_timeout_s
        self.layout = engine_layout(engine)
        self.aengine = AsyncEngine(engine, name="prefill-engine")
        self.aengine.layer_listener = self._layer_listener
        self._handoffs: dict[str, _Handoff] = {}
        self.completed = 0
        self.failed = 0
        self.bytes_sent = 0
        self.transfer_time_s = 0.0

    def start(self) -> "PrefillWorker":
        self.aengine.start()
        return self

    async def stop(self) -> None:
        self.aengine.stop()
        await self.sender.close()

    # -- engine thread: start transfers as layer groups finish ---------------
    def _layer_listener(self, scheduled: list[ScheduledSeq]):
        ready = [self._handoffs[s.seq.seq_id] for s in scheduled
                 if s.completes and s.seq.seq_id in self._handoffs]
        if not ready:
            return None
        group, total = self.group, self.num_layers

        def on_layer_done(layer: int) -> None:
            end = layer + 1
            if end % group and end != total:
                return
            start = (end - 1) // group * group
            for h in ready:
                buf = export_layers(self.engine, h.request_id, start, end, h.skip_tokens)
                h.loop.call_soon_threadsafe(self._send, h, start, end, buf)

        return on_layer_done

    def _send(self, h: _Handoff, start: int, end: int, buf) -> None:
        header = make_header(h.request_id, start, end, buf)
        h.bytes_sent += header.nbytes
        h.sends.append(asyncio.ensure_future(
            self.sender.send(h.endpoint, header, buf, h.timeout_s)))

    # -- RPC --------------------------------------------------------------------
    async def prefill(self, req: dict) -> dict:
        """Run one prompt and transfer its KV to ``req['target']``.

        req: {request_id, prompt_token_ids, params, target: {endpoint,
        skip_tokens, layout}}. Returns {meta, timings}."""
        rid = req["request_id"]
        target = req["target"]
        self.layout.check_compatible(KVLayout.from_dict(target["layout"]))
        params = SamplingParams.from_dict(req["params"])
        skip = int(target.get("skip_tokens", 0))
        h = _Handoff(rid, target["endpoint"], skip, asyncio.get_running_loop(),
                     float(req.get("transfer_timeout_s", self.transfer_timeout_s)))
        self._handoffs[rid] = h
        t0 = time.monotonic()
        finished = False
        queued_s = 0.0
        try:
            async for out in self.aengine.generate(rid, list(req["prompt_token_ids"]), params,
                                                   prefill_only=True):
                finished = out.finished
                queued_s = out.queue_s()
            t1 = time.monotonic()
            await asyncio.gather(*h.sends)
            t2 = time.monotonic()
            meta = await self.aengine.call(lambda e: export_meta(e, rid))
            self.completed += 1
            self.bytes_sent += h.bytes_sent
            self.transfer_time_s += t2 - t1
            return {"meta": meta.to_dict(),
                    "timings": {"prefill_s": t1 - t0, "prefill_queue_s": queued_s,
                                "transfer_wait_s": t2 - t1, "bytes": h.bytes_sent}}
        except BaseException:
            self.failed += 1
            for f in h.sends:
                f.cancel()
            raise
        finally:
            self._handoffs.pop(rid, None)
            if self.aengine.alive:
                # frees the held blocks (or aborts a request still running)
                await self.aengine.call(lambda e: e.release(rid) if finished else e.abort(rid))

    async def stats(self, _req: dict | None = None) -> PrefillStats:
        load = await self.aengine.call(lambda e: e.load_stats())
        return PrefillStats(engine=load, streams=self.aengine.num_streams,
                            inflight=len(self._handoffs), completed=self.completed,
                            failed=self.failed, bytes_sent=self.bytes_sent)
