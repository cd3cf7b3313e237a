"""A prefill worker and a decode worker in this process, talking real gRPC
(control plane and KV transfer) on 127.0.0.1. Used by the hand-off tests."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from splitserve.decode.worker import DecodeWorker
from splitserve.handoff import rpc
from splitserve.engine.config import EngineConfig
from splitserve.handoff.messages import GenerateRequest, PrefillPlacement
from splitserve.handoff.protocol import engine_layout
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.stats import stats_to_wire
from splitserve.handoff.transfer.base import KVSender, TransportConfig, get_transport
from splitserve.handoff.transfer.chunks import as_bytes
from splitserve.prefill.worker import PrefillWorker

TOKEN = "test-cluster-token"


def make_engine(path, **kw) -> LLMEngine:
    args = dict(model=str(path), model_id="tiny", num_blocks=64, block_size=4)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


@dataclass
class PD:
    prefill: PrefillWorker
    decode: DecodeWorker
    prefill_addr: str
    decode_addr: str
    client: rpc.WorkerClient
    servers: list

    def request(self, prompt, params, prefill=True, request_id=None,
                traceparent=None) -> GenerateRequest:
        return GenerateRequest(
            request_id=request_id or uuid.uuid4().hex, prompt_token_ids=list(prompt),
            params=params.to_dict(),
            prefill=PrefillPlacement(address=self.prefill_addr) if prefill else None,
            traceparent=traceparent)

    async def generate(self, prompt, params, prefill=True, request_id=None, traceparent=None):
        """Returns (token ids, the first output's GenerateTimings)."""
        toks, first = [], None
        req = self.request(prompt, params, prefill, request_id, traceparent)
        async for out in self.client.generate(req):
            toks += out.token_ids
            first = first or out.timings
        return toks, first

    def on_chunk(self, fault) -> None:
        """Run ``fault()`` on the decode receiver's thread as each KV chunk
        arrives, before its bytes are taken: a stalled link (sleep), a
        replica dying mid-transfer (stop a server, raise)."""
        res = self.decode.reservations
        expect = res.expect

        def expect_after_fault(handoff_id: str) -> int:
            fault()
            return expect(handoff_id)
        res.expect = expect_after_fault

    def corrupt_chunks(self) -> None:
        """Every KV chunk the prefill replica sends arrives with its first
        byte flipped, after the header's crc32 was taken."""
        self.prefill.sender = CorruptingSender(self.prefill.sender)

    async def close(self):
        await self.client.close()
        for s in self.servers:
            await s.stop(0)
        await self.prefill.stop()
        await self.decode.stop()

    def all_free(self) -> bool:
        return self.prefill.engine.kv.all_free() and self.decode.engine.kv.all_free()


class CorruptingSender(KVSender):
    """A sender whose wire flips the first byte of every chunk."""

    def __init__(self, inner: KVSender):
        super().__init__(inner.config)
        self.inner = inner

    async def send(self, endpoint, header, buf, timeout_s):
        on_the_wire = buf.clone()
        as_bytes(on_the_wire)[0] ^= 0xFF
        await self.inner.send(endpoint, header, on_the_wire, timeout_s)

    async def ping(self, endpoint, timeout_s):
        return await self.inner.ping(endpoint, timeout_s)

    async def close(self):
        await self.inner.close()


def stats_rpc(worker):
    """A worker's ``Stats`` RPC, as ``WorkerServer`` serves it."""
    async def reply(_req: dict) -> dict:
        return stats_to_wire(await worker.stats())
    return reply


async def start_pd(prefill_engine, decode_engine, transport="grpc", policy="local",
                   layer_group_size=1, transfer_timeout_s=10.0, lease_s=30.0,
                   prefill_timeout_s=30.0, prefill_tracer=None, decode_tracer=None) -> PD:
    sender_cls, receiver_cls = get_transport(transport)
    pw = PrefillWorker(prefill_engine, sender_cls(TransportConfig(token=TOKEN)),
                       layer_group_size, transfer_timeout_s, tracer=prefill_tracer).start()
    dw = DecodeWorker(decode_engine,
                      receiver_cls(TransportConfig(token=TOKEN, layout=engine_layout(decode_engine))),
                      TOKEN, on_prefill_failure=policy, lease_s=lease_s,
                      prefill_timeout_s=prefill_timeout_s, sweep_s=0.05,
                      tracer=decode_tracer).start()
    psrv, paddr = await rpc.serve({"Prefill": pw.prefill, "Stats": stats_rpc(pw)}, {}, TOKEN)
    dsrv, daddr = await rpc.serve({"Stats": stats_rpc(dw)}, {"Generate": dw.generate}, TOKEN)
    return PD(pw, dw, paddr, daddr, rpc.WorkerClient(daddr, TOKEN), [psrv, dsrv])


async def wait_until(pred, timeout=5.0, period=0.02) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if pred():
            return True
        await asyncio.sleep(period)
    return pred()
