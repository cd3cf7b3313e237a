"""Fault isolation and deadlines through the ingress's ClusterBackend, with
one prefill and two decode workers in this process on real gRPC (loopback)
and a scripted router.

A poisoned request is one whose sequence, once it has two outputs, feeds
the model a token id past the vocabulary: the embedding really raises. It
fails alone on each engine it meets, is moved to another decode replica at
most once, and the streams beside it finish with their reference tokens.
A stalled stream (a hand-off or an engine thread held up) hits its
deadline: the client gets DeadlineExceeded and both pools get their blocks
back."""

import asyncio
import itertools
import threading
import time

import pytest

from splitserve.cluster.api.backend import DeadlineExceeded
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve.orchestrator import ClusterBackend
from splitserve.decode.worker import DecodeWorker
from splitserve.engine.errors import RequestFailedError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.handoff import rpc
from splitserve.handoff.protocol import engine_layout
from splitserve.handoff.transfer.base import TransportConfig, get_transport
from splitserve.router.types import NoCapacityError, Placement
from tests.integration.pd_harness import TOKEN, make_engine, start_pd, stats_rpc, wait_until

GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
POISON = [77, 78, 79]  # a prompt starting so is poisoned (see poison_engine)
PROMPTS = [[5, 6, 7, 8], [11, 12], [40, 41, 42, 43, 44, 45], [3, 9]]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return [r.token_ids for r in make_engine(tiny_llama).generate(PROMPTS, GREEDY)]


def poison_engine(engine) -> None:
    """From its second output on, a poisoned sequence's last token id is
    past the vocabulary when the model reads it (F.embedding raises)."""
    execute = engine.runner.execute
    bad = engine.model_cfg.vocab_size + 5

    def execute_poisoned(scheduled, kv, on_layer_done=None):
        for s in scheduled:
            seq = s.seq
            if seq.token_ids[:len(POISON)] == POISON and seq.num_output_tokens >= 2:
                seq.token_ids[-1] = bad
        return execute(scheduled, kv, on_layer_done)
    engine.runner.execute = execute_poisoned


class ScriptedRouter:
    """The ingress's router client (``RouterClient``'s methods), placing
    decode replicas in turn (skipping excluded ones), always with the one
    prefill replica; records every placement and release."""

    def __init__(self, prefill: str, decodes: list[str]):
        self.prefill, self.decodes = prefill, decodes
        self.placements: list[tuple[str, str]] = []
        self.resumed: list[tuple[str, bool]] = []  # request, placed as a resumed stream
        self.released = 0
        self.withdrawn: list[tuple[str, int]] = []
        self._next = 0
        self._leases = itertools.count()

    def new_lease(self) -> str:
        return f"lease-{next(self._leases)}"

    async def place(self, lease_id: str, req, *, arrival: float, admitted: bool = False,
                    deadline: float | None = None, priority: int = 0,
                    traceparent: str | None = None, resumed: bool = False,
                    group: tuple[str, int] | None = None):
        choices = [d for d in self.decodes if d not in req.exclude_replicas]
        if not choices:
            raise NoCapacityError("every decode replica excluded", req.model, 1.0)
        d = choices[self._next % len(choices)]
        self._next += 1
        self.placements.append((req.request_id.split("-")[0], d))
        self.resumed.append((req.request_id.split("-")[0], resumed))
        return Placement(self.prefill, d, "round_robin", 0.0, 0)

    def release(self, lease_id: str, output_tokens: int = -1) -> None:
        self.released += 1

    def suspect(self, replica_id: str) -> None:
        pass

    def withdraw(self, group: tuple[str, int]) -> None:
        self.withdrawn.append(group)  # nothing waits on a group here: recorded only

    async def close(self) -> None:
        pass


class Cluster:
    """1 prefill + 2 decode workers and a ClusterBackend over them."""

    def __init__(self, pd, decode2, server2, addr2, backend, router):
        self.pd, self.decode2, self.server2 = pd, decode2, server2
        self.decodes = [pd.decode, decode2]
        self.addresses = [pd.decode_addr, addr2]
        self.backend, self.router = backend, router

    def engines(self):
        return [self.pd.prefill.engine] + [d.engine for d in self.decodes]

    def all_free(self) -> bool:
        return all(e.kv.all_free() for e in self.engines())

    async def close(self):
        await self.backend.close()
        await self.server2.stop(0)
        await self.decode2.stop()
        await self.pd.close()


async def start_cluster(path, poison=False, **deadlines) -> Cluster:
    engines = [make_engine(path) for _ in range(3)]
    if poison:
        for e in engines:
            poison_engine(e)
    pd = await start_pd(engines[0], engines[1])
    _, receiver_cls = get_transport("grpc")
    d2 = DecodeWorker(engines[2], receiver_cls(TransportConfig(
        token=TOKEN, layout=engine_layout(engines[2]))), TOKEN, sweep_s=0.05).start()
    srv2, addr2 = await rpc.serve({"Stats": stats_rpc(d2)}, {"Generate": d2.generate}, TOKEN)
    cfg = parse_config({
        "models": [{"model": {"name": "tiny", "path": str(path), "num_blocks": 64,
                              "block_size": 4}}],
        "deadlines": deadlines or {},
        "auth": {"cluster_token": TOKEN},
    })
    router = ScriptedRouter(pd.prefill_addr, [pd.decode_addr, addr2])
    return Cluster(pd, d2, srv2, addr2, ClusterBackend(cfg, router=router, token=TOKEN), router)


async def collect(be, rid, prompt, params=GREEDY):
    toks = []
    async for d in be.generate("tiny", rid, prompt, params):
        toks += d["token_ids"]
    return toks


def test_a_poisoned_request_fails_alone_and_is_resumed_at_most_once(tiny_llama, reference):
    async def main():
        c = await start_cluster(tiny_llama, poison=True)
        try:
            seen = []

            async def poisoned():
                with pytest.raises(RequestFailedError, match="failed on 2 decode replicas") as e:
                    async for d in c.backend.generate("tiny", "poison", POISON + [1], GREEDY):
                        seen.extend(d["token_ids"])
                return e.value
            *good, err = await asyncio.gather(
                *[collect(c.backend, f"good{i}", p) for i, p in enumerate(PROMPTS)], poisoned())
            assert good == reference
            # two tokens on the first replica, two more after the resume; none duplicated
            assert len(seen) == 4
            tried = [d for rid, d in c.router.placements if rid == "poison"]
            assert sorted(tried) == sorted(c.addresses)  # placed twice: once more, not again
            assert c.backend.counters["faults"] == 2 and c.backend.counters["failed"] == 1
            assert all(d.aengine.alive for d in c.decodes) and c.pd.prefill.aengine.alive
            assert [d.engine.num_failed_requests for d in c.decodes] == [1, 1]
            assert await wait_until(c.all_free)
            for e in c.engines():
                e.kv.check_invariants()
            assert c.router.released == len(PROMPTS) + 1
            # the replicas keep serving
            assert await collect(c.backend, "after", PROMPTS[0]) == reference[0]
        finally:
            await c.close()
    asyncio.run(main())


def test_a_replica_that_stops_answering_is_still_left_for_another(tiny_llama, reference):
    """A decode server that goes away mid-stream is no sign of a poisoned
    request: the stream resumes on the other replica, with no lost or
    duplicated tokens, and counts no fault."""
    async def main():
        c = await start_cluster(tiny_llama)
        try:
            got = []
            async for d in c.backend.generate("tiny", "r", PROMPTS[2], GREEDY):
                got += d["token_ids"]
                if len(got) == 3:
                    first = d["placement"]["decode"]
                    server = c.pd.servers[1] if first == c.pd.decode_addr else c.server2
                    await server.stop(0)
            assert got == reference[2]
            assert c.backend.counters["resumed"] == 1 and c.backend.counters["faults"] == 0
            # placed again as a resumed stream: the router queues it ahead of new
            # requests and bounds its wait by router.max_resume_wait_s
            assert c.router.resumed == [("r", False), ("r", True)]
        finally:
            await c.close()
    asyncio.run(main())


def test_a_stalled_hand_off_hits_the_first_output_deadline_and_frees_both_sides(tiny_llama):
    async def main():
        c = await start_cluster(tiny_llama, first_output_s=0.5, inter_token_s=5.0)
        try:
            c.router.decodes = [c.pd.decode_addr]  # the replica whose link stalls
            c.pd.on_chunk(lambda: time.sleep(1.5))
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="first_output_s"):
                await collect(c.backend, "stalled", PROMPTS[2])
            assert time.monotonic() - t0 < 1.4
            assert c.backend.counters["deadlines"] == 1
            assert await wait_until(c.all_free, timeout=10)
            for e in c.engines():
                e.kv.check_invariants()
            assert len(c.pd.decode.reservations) == 0 and not c.pd.prefill._handoffs
        finally:
            await c.close()
    asyncio.run(main())


def test_a_stalled_decode_hits_the_inter_token_deadline_and_frees_kv(tiny_llama):
    async def main():
        c = await start_cluster(tiny_llama, first_output_s=5.0, inter_token_s=0.3)
        try:
            release = threading.Event()
            got = []
            with pytest.raises(DeadlineExceeded, match="inter_token_s"):
                async for d in c.backend.generate("tiny", "slow", PROMPTS[0], GREEDY):
                    got += d["token_ids"]
                    if len(got) == 2:  # hold that replica's engine thread up
                        dec = next(w for w, a in zip(c.decodes, c.addresses)
                                   if a == d["placement"]["decode"])
                        stall = asyncio.ensure_future(dec.aengine.call(lambda e: release.wait(3)))
            assert 2 <= len(got) < GREEDY.max_tokens  # what was on its way still came
            release.set()
            await stall
            assert await wait_until(c.all_free, timeout=10)
            assert all(d.aengine.num_streams == 0 for d in c.decodes)
        finally:
            await c.close()
    asyncio.run(main())


def test_a_request_that_breaks_prefill_is_not_prefilled_again_on_decode(tiny_llama, reference):
    """The prefill engine fails the request alone (REQUEST_FAILED): the
    decode replica passes that on instead of prefilling it itself, and the
    ingress tries one more pair, not more."""
    async def main():
        c = await start_cluster(tiny_llama)
        prefill = c.pd.prefill.engine
        execute = prefill.runner.execute

        def poisoned_prompt(scheduled, kv, on_layer_done=None):
            for s in scheduled:
                if s.seq.token_ids[:len(POISON)] == POISON:
                    s.seq.token_ids[len(POISON)] = prefill.model_cfg.vocab_size
            return execute(scheduled, kv, on_layer_done)
        prefill.runner.execute = poisoned_prompt
        try:
            bad = asyncio.ensure_future(collect(c.backend, "poison", POISON + [4, 5]))
            good = await asyncio.gather(*[collect(c.backend, f"g{i}", p)
                                          for i, p in enumerate(PROMPTS)])
            with pytest.raises(RequestFailedError, match="failed on 2 decode replicas"):
                await bad
            assert good == reference
            assert [d.counters["fallbacks"] for d in c.decodes] == [0, 0]
            assert prefill.num_failed_requests == 2 and c.pd.prefill.failed == 2
            assert await wait_until(c.all_free)
        finally:
            await c.close()
    asyncio.run(main())


def test_a_prefill_past_its_deadline_is_cancelled_there_and_run_on_decode(tiny_llama, reference):
    """The Prefill call carries transfer.prefill_timeout_s as its deadline:
    past it the prefill replica drops the request (its blocks freed) and the
    decode replica prefills the prompt itself."""
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama),
                            prefill_timeout_s=0.5)
        try:
            release = threading.Event()
            stall = asyncio.ensure_future(pd.prefill.aengine.call(lambda e: release.wait(3)))
            toks, timings = await pd.generate(PROMPTS[2], GREEDY)
            assert toks == reference[2]
            assert timings.mode.value == "local" and "DEADLINE_EXCEEDED" in timings.fallback_reason
            release.set()
            await stall
            assert await wait_until(pd.all_free, 10)
            assert pd.prefill.failed == 1 and not pd.prefill._handoffs
            assert await pd.prefill.aengine.call(lambda e: not e.requests)
        finally:
            await pd.close()
    asyncio.run(main())


def test_a_resumed_streams_usage_counts_only_its_clients_prompt(tiny_llama, reference):
    """The replica a stream resumes on prefills prompt + earlier output and
    may find most of it cached (it served the same request before): the
    client's usage still speaks of its own prompt, as the first replica
    reported it, never of more cached tokens than the prompt has."""
    async def main():
        c = await start_cluster(tiny_llama)
        try:
            a, b = c.addresses
            c.router.decodes = [b]  # b caches prompt + output of this request
            assert await collect(c.backend, "warm", PROMPTS[2]) == reference[2]
            c.router.decodes, c.router._next = [a, b], 0
            got, cached = [], []
            async for d in c.backend.generate("tiny", "r", PROMPTS[2], GREEDY):
                got += d["token_ids"]
                cached.append((d["placement"]["decode"], d["cached_tokens"], d["prompt_tokens"]))
                if len(got) == 3:
                    assert d["placement"]["decode"] == a
                    await c.pd.servers[1].stop(0)
            assert got == reference[2] and c.backend.counters["resumed"] == 1
            assert cached[-1][0] == b  # it went on on b, where all it had was cached
            assert {(n, p) for _, n, p in cached} == {(cached[0][1], len(PROMPTS[2]))}, cached
        finally:
            await c.close()
    asyncio.run(main())
