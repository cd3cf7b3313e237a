"""A prefill worker and a decode worker in this process, talking real gRPC
(control plane and KV transfer) on 127.0.0.1. Used by the hand-off tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from splitserve.decode.worker import DecodeWorker
from splitserve.handoff import rpc
from splitserve.engine.config import EngineConfig
from splitserve.handoff.protocol import engine_layout
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.stats import stats_to_wire
from splitserve.handoff.transfer.base import TransportConfig, get_transport
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

    async def generate(self, prompt, params, prefill=True, request_id=None):
        body = {"prompt_token_ids": list(prompt), "params": params.to_dict(),
                "prefill": {"address": self.prefill_addr} if prefill else None}
        if request_id:
            body["request_id"] = request_id
        toks, first = [], None
        async for d in self.client.stream("Generate", body):
            toks += d["token_ids"]
            first = first or d.get("timings")
        return toks, first

    async def close(self):
        await self.client.close()
        for s in self.servers:
            await s.stop(0)
        await self.prefill.stop()
        await self.decode.stop()

    def all_free(self) -> bool:
        return self.prefill.engine.kv.all_free() and self.decode.engine.kv.all_free()


def stats_rpc(worker):
    """A worker's ``Stats`` RPC, as ``WorkerServer`` serves it."""
    async def reply(_req: dict) -> dict:
        return stats_to_wire(await worker.stats())
    return reply


async def start_pd(prefill_engine, decode_engine, transport="grpc", policy="local",
                   layer_group_size=1, transfer_timeout_s=10.0, lease_s=30.0,
                   prefill_timeout_s=30.0) -> PD:
    sender_cls, receiver_cls = get_transport(transport)
    pw = PrefillWorker(prefill_engine, sender_cls(TransportConfig(token=TOKEN)),
                       layer_group_size, transfer_timeout_s).start()
    dw = DecodeWorker(decode_engine,
                      receiver_cls(TransportConfig(token=TOKEN, layout=engine_layout(decode_engine))),
                      TOKEN, on_prefill_failure=policy, lease_s=lease_s,
                      prefill_timeout_s=prefill_timeout_s, sweep_s=0.05).start()
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
