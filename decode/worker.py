"""DecodeWorker: receives KV, runs the continuous decode batch, streams tokens.

Request lifecycle and queues:

  Generate RPC (from the ingress, with the router's placement)
    -> Prealloc: reserve blocks for the prompt with a lease (refused with
       RESOURCE_EXHAUSTED when they do not fit: the ingress tries another
       replica); blocks of a prefix this replica already caches are not sent
    -> Transfer: ask the chosen prefill replica to run the prompt; its KV
       lands in the reserved blocks through this worker's KV receiver
    -> Commit: the reservation becomes a running sequence, the first token
       (sampled by prefill) is processed here, decoding continues in the
       running batch
    -> tokens stream back on the RPC until a stop condition

  Without a prefill placement, or when the hand-off fails and the policy is
  ``local``, the prompt is prefilled here (the colocated path). Cancelling the
  RPC at any point cancels the prefill call, the reservation and the
  sequence; expired leases are swept every ``sweep_s``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from splitserve.engine.async_engine import AsyncEngine
from splitserve.handoff.protocol import HandoffMeta, Reservations
from splitserve.engine.llm_engine import LLMEngine
from splitserve.handoff.rpc import RpcError, WorkerClients
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.stats import DecodeStats
from splitserve.handoff.transfer.base import KVReceiver

FALLBACK_POLICIES = ("local", "error")


class DecodeWorker:
    def __init__(self, engine: LLMEngine, receiver: KVReceiver, token: str,
                 on_prefill_failure: str = "local", lease_s: float = 30.0,
                 prefill_timeout_s: float = 60.0, sweep_s: float = 0.5):
        if on_prefill_failure not in FALLBACK_POLICIES:
            raise ValueError(f"on_prefill_failure must be one of {FALLBACK_POLICIES}")
        self.engine = engine
        self.receiver = receiver
        self.on_prefill_failure = on_prefill_failure
        self.lease_s = lease_s
        self.prefill_timeout_s = prefill_timeout_s
        self.sweep_s = sweep_s
        self.reservations = Reservations(engine, lease_s)
        self.aengine = AsyncEngine(engine, name="decode-engine")
        self.kv_endpoint = ""
        self.transport = type(receiver).__name__
        self._clients = WorkerClients(token)
        self._sweeper: asyncio.Task | None = None
        self.draining = False
        self.counters = {"handoffs": 0, "local_prefills": 0, "fallbacks": 0, "refused": 0,
                         "expired": 0, "handoff_bytes": 0}

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
            if self.aengine.alive:
                dead = await self.aengine.call(lambda e: self.reservations.expire())
                self.counters["expired"] += len(dead)

    # -- RPC ----------------------------------------------------------------
    async def generate(self, req: dict) -> AsyncIterator[dict]:
        """req: {request_id?, prompt_token_ids, params, prefill: {address}|None}.
        Yields output dicts (``RequestOutput.to_dict``)."""
        rid = req.get("request_id") or uuid.uuid4().hex
        ids = list(req["prompt_token_ids"])
        params = SamplingParams.from_dict(req["params"])
        await self.aengine.call(lambda e: e.validate(ids, params))
        prefill = req.get("prefill")
        stream = None
        t0 = time.monotonic()
        timings: dict[str, float] = {}
        if prefill:
            stream = await self._remote_prefill(rid, ids, params, prefill["address"], timings)
        if stream is None:
            self.counters["local_prefills"] += 1
            timings["mode"] = "local"
            stream = self.aengine.generate(rid, ids, params)
        first = True
        async for out in stream:
            d = out.to_dict()
            if first:
                timings["ttft_s"] = time.monotonic() - t0
                if timings["mode"] == "local":
                    timings["local_queue_s"] = out.queue_s()
                d["timings"] = timings
                first = False
            yield d

    async def _remote_prefill(self, rid: str, ids: list[int], params: SamplingParams,
                              address: str, timings: dict):
        """Reserve, have ``address`` prefill into the reservation, commit.
        Returns the token stream, or None to prefill locally."""
        layout = self.reservations.layout
        try:
            r = await self.aengine.call(
                lambda e: self.reservations.reserve(rid, layout, ids, params.max_tokens))
        except Exception:
            self.counters["refused"] += 1
            raise
        t0 = time.monotonic()
        try:
            reply = await self._clients.get(address).call("Prefill", {
                "request_id": rid, "prompt_token_ids": ids, "params": params.to_dict(),
                "target": {"endpoint": self.kv_endpoint, "skip_tokens": r.cached_tokens,
                           "layout": layout.to_dict()},
            }, timeout=self.prefill_timeout_s)
        except (RpcError, asyncio.TimeoutError) as e:
            await self.aengine.call(lambda e_: self.reservations.cancel(rid))
            if self.on_prefill_failure == "error":
                raise
            self.counters["fallbacks"] += 1
            timings["fallback_reason"] = str(e)[:200]
            return None
        except BaseException:  # cancelled by the client: free the reservation
            if self.aengine.alive:
                await asyncio.shield(self.aengine.call(lambda e: self.reservations.cancel(rid)))
            raise
        timings.update(mode="remote", handoff_s=time.monotonic() - t0, **reply.get("timings", {}))
        self.counters["handoffs"] += 1
        self.counters["handoff_bytes"] += int(reply.get("timings", {}).get("bytes", 0))
        meta = HandoffMeta.from_dict(reply["meta"])
        try:
            matcher = await self.aengine.build_matcher(ids, params)
        except BaseException:
            if self.aengine.alive:
                await asyncio.shield(self.aengine.call(lambda e: self.reservations.cancel(rid)))
            raise
        return self.aengine.adopt(lambda e: self.reservations.commit(meta, matcher), rid)

    async def stats(self, _req: dict | None = None) -> DecodeStats:
        load, reservations = await self.aengine.call(
            lambda e: (e.load_stats(), len(self.reservations)))
        c = self.counters
        return DecodeStats(engine=load, streams=self.aengine.num_streams,
                           reservations=reservations, handoffs=c["handoffs"],
                           local_prefills=c["local_prefills"], fallbacks=c["fallbacks"],
                           refused=c["refused"], expired=c["expired"],
                           handoff_bytes=c["handoff_bytes"], kv_endpoint=self.kv_endpoint)
