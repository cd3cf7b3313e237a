"""A stream cut by its decode replica's death resumes even when the first
replica it is placed on next refuses it for want of free KV blocks: the
router's view of that replica's room was stale (under load, every stream
of the dead replica lands on the survivors at once). The refusal comes
before the new attempt has produced anything, so the stream is placed
again elsewhere, as a new request would be; the client sees its reference
tokens with none lost or repeated.

In this process: one prefill and three decode workers on real gRPC
(loopback), the ingress's ClusterBackend, and the scripted router of
``tests.integration.test_isolation``."""

import asyncio

from splitserve.cluster.config import parse_config
from splitserve.cluster.serve.orchestrator import ClusterBackend
from splitserve.decode.worker import DecodeWorker
from splitserve.handoff import rpc
from splitserve.handoff.protocol import engine_layout
from splitserve.handoff.transfer.base import TransportConfig, get_transport
from tests.integration.pd_harness import TOKEN, make_engine, start_pd, stats_rpc, wait_until
from tests.integration.test_isolation import GREEDY, PROMPTS, ScriptedRouter

FULL_BLOCKS = 16  # the full replica's whole cache


async def decode_worker(engine):
    _, receiver_cls = get_transport("grpc")
    w = DecodeWorker(engine, receiver_cls(TransportConfig(token=TOKEN, layout=engine_layout(engine))),
                     TOKEN, sweep_s=0.05).start()
    server, address = await rpc.serve({"Stats": stats_rpc(w)}, {"Generate": w.generate}, TOKEN)
    return w, server, address


def test_a_resumed_stream_refused_by_a_full_replica_is_placed_again(tiny_llama):
    want = make_engine(tiny_llama).generate([PROMPTS[2]], GREEDY)[0].token_ids

    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama))
        full, full_srv, full_addr = await decode_worker(make_engine(tiny_llama,
                                                                    num_blocks=FULL_BLOCKS))
        spare, spare_srv, spare_addr = await decode_worker(make_engine(tiny_llama))
        # every block of the full replica held by a hand-off that is still arriving
        res = full.reservations
        await full.aengine.call(lambda e: res.reserve(
            "hog", res.layout, list(range(3, 3 + FULL_BLOCKS * 4 - 1)), 1))
        # placed in turn, skipping excluded replicas: first the one that dies,
        # then (resumed) the full one, then the spare
        router = ScriptedRouter(pd.prefill_addr, [pd.decode_addr, spare_addr, full_addr])
        cfg = parse_config({
            "models": [{"model": {"name": "tiny", "path": str(tiny_llama), "num_blocks": 64,
                                  "block_size": 4}}],
            "auth": {"cluster_token": TOKEN},
        })
        be = ClusterBackend(cfg, router=router, token=TOKEN)
        try:
            got, served_by = [], []
            async for d in be.generate("tiny", "r", PROMPTS[2], GREEDY):
                got += d["token_ids"]
                served_by.append(d["placement"]["decode"])
                if len(got) == 3 and served_by[0] == pd.decode_addr:
                    await pd.servers[1].stop(0)  # the decode replica goes away mid-stream
            assert got == want
            assert [d for _, d in router.placements] == [pd.decode_addr, full_addr, spare_addr]
            assert router.resumed == [("r", False), ("r", True), ("r", True)]
            assert served_by[0] == pd.decode_addr and served_by[-1] == spare_addr
            assert be.counters["resumed"] == 2 and be.counters["retries"] == 0  # moves after tokens
            assert full.counters["refused"] == 1
            # nothing leaked: the refusal held nothing, the hog still holds its own
            await full.aengine.call(lambda e: res.cancel("hog"))
            assert await wait_until(lambda: all(
                e.kv.all_free() for e in (pd.prefill.engine, spare.engine, full.engine)))
        finally:
            await be.close()
            for srv, w in ((full_srv, full), (spare_srv, spare)):
                await srv.stop(0)
                await w.stop()
            await pd.close()
    asyncio.run(main())
