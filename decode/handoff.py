"""IncomingHandoff: one request's KV coming from a prefill replica.

Stages (``IncomingHandoff.stage``), each entered by one method:

  reserve   blocks for the prompt held with a lease; blocks of a prefix this
            replica caches already (under the same adapter) are not sent. Refused with
            OutOfBlocksError (RESOURCE_EXHAUSTED) when they do not fit
                                                              -> RESERVED
  receive   the Prefill call: the prefill replica runs the prompt and its KV
            lands in the reserved blocks through the worker's KV receiver
                                                              -> RECEIVING
  commit    the reservation becomes a running sequence; the first token
            (sampled by prefill) is processed here          -> COMMITTED
  running   its first token came out of the running batch    -> RUNNING
  cancel    on any failure before commit: the blocks are freed -> CANCELLED
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import AsyncIterator

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.errors import EngineDeadError
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.kv_port import AdapterRef
from splitserve.handoff.messages import Adapter, PrefillReply, PrefillRequest, PrefillTarget
from splitserve.handoff.protocol import Reservations
from splitserve.handoff.rpc import WorkerClient


class DecodeStage(enum.Enum):
    NEW = "new"
    RESERVED = "reserved"
    RECEIVING = "receiving"
    COMMITTED = "committed"
    RUNNING = "running"
    CANCELLED = "cancelled"


class IncomingHandoff:
    def __init__(self, aengine: AsyncEngine, reservations: Reservations, request_id: str,
                 prompt_token_ids: list[int], params: SamplingParams,
                 adapter: AdapterRef | None = None):
        self.aengine = aengine
        self.adapter = adapter  # the LoRA adapter both replicas compute its KV with
        self.reservations = reservations
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.stage = DecodeStage.NEW
        self.cached_tokens = 0  # of the prompt, cached here: not received
        self.prefill_cached_tokens = 0  # of the prompt, cached on the prefill replica
        self.handoff_s = 0.0

    async def reserve(self) -> None:
        """-> RESERVED. Raises (nothing held) when this replica cannot take it."""
        res, rid = self.reservations, self.request_id
        r = await self.aengine.call(
            lambda e: res.reserve(rid, res.layout, self.prompt_token_ids, self.params.max_tokens,
                                  self.adapter))
        self.cached_tokens = r.cached_tokens
        self.stage = DecodeStage.RESERVED

    async def receive(self, prefill: WorkerClient, kv_endpoint: str, timeout_s: float,
                      traceparent: str | None = None) -> PrefillReply:
        """RESERVED -> RECEIVING: have ``prefill`` run the prompt into the
        reservation (``traceparent``: the span its work belongs to). Returns
        its reply once every chunk landed."""
        self.stage = DecodeStage.RECEIVING
        t0 = time.monotonic()
        reply = await prefill.prefill(PrefillRequest(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
            params=self.params.to_dict(),
            target=PrefillTarget(endpoint=kv_endpoint, skip_tokens=self.cached_tokens,
                                 layout=self.reservations.layout),
            adapter=Adapter.of(self.adapter), traceparent=traceparent), timeout=timeout_s)
        self.handoff_s = time.monotonic() - t0
        self.prefill_cached_tokens = min(reply.cached_tokens, len(self.prompt_token_ids))
        return reply

    @property
    def prompt_cached_tokens(self) -> int:
        """The prompt tokens whose KV came from a prefix cache, this
        replica's or the prefill replica's: both are prefixes of the same
        prompt, so the longer one covers the other (never their sum)."""
        return max(self.cached_tokens, self.prefill_cached_tokens)

    async def commit(self, reply: PrefillReply) -> AsyncIterator[RequestOutput]:
        """RECEIVING -> COMMITTED: the received sequence joins the running
        batch (on the engine thread, when its stream is first read).
        Returns that stream; ``running`` marks its first output."""
        matcher = await self.aengine.build_matcher(self.prompt_token_ids, self.params)
        meta, res = reply.meta, self.reservations
        self.stage = DecodeStage.COMMITTED
        return self.aengine.adopt(lambda e: res.commit(meta, matcher), self.request_id)

    def running(self) -> None:
        """COMMITTED -> RUNNING: its first token came out of the running batch."""
        self.stage = DecodeStage.RUNNING

    async def cancel(self) -> None:
        """-> CANCELLED: free the reservation (idempotent). Survives the
        caller's own cancellation."""
        self.stage = DecodeStage.CANCELLED
        rid, res = self.request_id, self.reservations
        try:
            await asyncio.shield(self.aengine.call(lambda e: res.cancel(rid)))
        except EngineDeadError:  # its blocks went with the engine
            pass
