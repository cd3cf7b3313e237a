"""A request's priority and its client's timeout at the router queue, on a
real local Ray cluster: one colocated replica running one sequence at a
time, kept busy by a chain of long most-urgent requests (the tiny model's
context is 256 tokens: one request alone holds it for about a second)
while everything else waits at the router.
Urgent requests (priority -1 over HTTP and gRPC), sent after normal ones,
run before all of them; a request whose x-request-timeout passes while it
waits gets 429 then, not after router.max_queue_delay_s (120 s here)."""

import asyncio
import time

import grpc
import httpx
import pytest
import ray

from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.cluster.serve.router_actor import get_router
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.slow

KEY = "sk-priority-test"
MD = (("authorization", f"Bearer {KEY}"),)
HOLDERS = 5


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    cfg = parse_config({
        "models": [{"model": {"name": "tiny", "path": str(tiny_llama), "num_blocks": 1024,
                              "block_size": 4, "max_num_seqs": 1},
                    "mode": "colocated",
                    "decode": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}}],
        "router": {"routers": 1, "stats_period_s": 0.1, "stats_ttl_s": 2.0,
                   "lease_ttl_s": 2.0, "max_queue_delay_s": 120.0},
        "auth": {"api_keys": [KEY], "cluster_token": "priority-test-token"},
        "endpoints": {"http_port": free_port(), "grpc_port": free_port()},
    })
    with local_ray(num_cpus=4):
        app.deploy(cfg, wait_s=240)
        yield cfg


def router_counters() -> dict:
    return ray.get(get_router().counters.remote())


async def queued_at_router(n: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (await asyncio.to_thread(router_counters))["queued"]["tiny"] >= n:
            return True
        await asyncio.sleep(0.05)
    return False


async def replica_busy_at_router(timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reps = await asyncio.to_thread(lambda: ray.get(get_router().replicas.remote())["tiny"])
        if any(r["running_seqs"] >= 1 for pool in reps.values() for r in pool):
            return True
        await asyncio.sleep(0.05)
    return False


async def http_request(http, cfg, prompt, max_tokens, priority=None, headers=None,
                       started=None):
    """(status, monotonic time of the first token or of the answer, body text)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    if priority is not None:
        body["priority"] = priority
    async with http.stream("POST", f"http://127.0.0.1:{cfg.endpoints.http_port}/v1/completions",
                           json=body, headers={"Authorization": f"Bearer {KEY}",
                                               **(headers or {})}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, time.monotonic(), r.text, r.headers.get("retry-after")
        first = None
        async for line in r.aiter_lines():
            if line.startswith("data: {") and first is None:
                first = time.monotonic()
                if started is not None:
                    started.set()
        return 200, first, "", None


async def grpc_request(cfg, prompt, max_tokens, priority):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}") as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(model="tiny", text=prompt, priority=priority,
                                 params=pb.SamplingParams(max_tokens=max_tokens, temperature=0,
                                                          ignore_eos=True))
        first = None
        async for _ in stub.Generate(req, metadata=MD, timeout=120):
            first = first or time.monotonic()
        return first


def test_priority_orders_the_queue_and_the_clients_timeout_bounds_its_wait(cluster):
    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            # the replica's one seat (its stats show it taken once it streams), then
            # HOLDERS - 1 more waiting ahead of everyone
            started = asyncio.Event()
            holders = [asyncio.ensure_future(http_request(http, cluster, "hold 0", 240,
                                                          priority=-10, started=started))]
            await asyncio.wait_for(started.wait(), 60)
            # and the router has seen that seat taken (its stats lag the first
            # token on a loaded machine): the next holders wait at the router
            assert await replica_busy_at_router(), router_counters()
            holders += [asyncio.ensure_future(http_request(http, cluster, f"hold {i}", 240,
                                                           priority=-10))
                        for i in range(1, HOLDERS)]
            if not await queued_at_router(HOLDERS - 1):
                done = [h.result()[:3] for h in holders if h.done()]
                raise AssertionError(f"the holders did not wait: {router_counters()}, {done}")
            normal = [asyncio.ensure_future(http_request(http, cluster, f"normal {i}", 16))
                      for i in range(3)]
            sent = time.monotonic()
            timed = asyncio.ensure_future(http_request(
                http, cluster, "timed", 16, headers={"x-request-timeout": "0.8"}))
            await asyncio.sleep(0.1)  # the normal ones arrive first
            urgent = [asyncio.ensure_future(http_request(http, cluster, f"urgent {i}", 16,
                                                         priority=-1)) for i in range(3)]
            urgent += [asyncio.ensure_future(grpc_request(cluster, "urgent grpc", 16, -1))]
            # the premise: all of them wait at the router together
            assert await queued_at_router(3 + 1 + 4), router_counters()["queued"]
            timed_out = await timed
            assert [s for s, *_ in await asyncio.gather(*holders)] == [200] * HOLDERS
            return sent, timed_out, await asyncio.gather(*normal), await asyncio.gather(*urgent)

    sent, timed, normal, urgent = asyncio.run(main())
    assert [s for s, *_ in normal] == [200] * 3
    assert all(r[0] == 200 for r in urgent[:3])
    firsts = [r[1] for r in urgent[:3]] + [urgent[3]]
    assert max(firsts) < min(r[1] for r in normal), (firsts, [r[1] for r in normal])
    status, at, text, retry_after = timed
    assert status == 429 and retry_after and "queue" in text, timed
    assert 0.7 <= at - sent < 10.0, at - sent
    deadline = time.monotonic() + 20
    while router_counters()["in_flight"] != {"tiny": 0}:
        assert time.monotonic() < deadline, router_counters()
        time.sleep(0.2)
