"""Bursts wait at the router, and no admission slot leaks, on a real local
Ray cluster: ingress (HTTP via Serve's proxy, gRPC), two routers, one
prefill and two decode replicas of a tiny model, each decode replica
running at most two sequences (the pool holds 4)."""

import asyncio
import dataclasses
import json
import threading
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

KEY = "sk-queue-test"
CAPACITY = 4  # 2 decode replicas x max_num_seqs 2
ROUTERS = 2
WAVE_TOKENS = 160  # two such sequences fill a decode replica's 96 blocks of 4


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    cfg = parse_config({
        "models": [{"model": {"name": "tiny", "path": str(tiny_llama), "num_blocks": 96,
                              "block_size": 4, "max_num_seqs": 2},
                    "prefill": pool, "decode": {**pool, "min_replicas": 2, "max_replicas": 2}}],
        "router": {"routers": ROUTERS, "local_prefill_max_tokens": 0, "stats_period_s": 0.1,
                   "stats_ttl_s": 2.0, "lease_ttl_s": 2.0, "max_queue_delay_s": 120.0,
                   "expected_output_tokens": 16},
        "auth": {"api_keys": [KEY], "cluster_token": "queue-test-token"},
        "endpoints": {"http_port": free_port(), "grpc_port": free_port()},
    })
    with local_ray(num_cpus=4):
        app.deploy(cfg, wait_s=180)
        yield cfg


def counters() -> list[dict]:
    return [ray.get(get_router(index=i).counters.remote()) for i in range(ROUTERS)]


def slots_settle(timeout_s: float = 20.0) -> list[dict]:
    """Every router's counters once no slot is held and nothing waits."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            cs = counters()
        except ray.exceptions.RayActorError:  # a router restarting
            cs = None
        if cs is not None and all(c["in_flight"] == {"tiny": 0} and c["queued"] == {"tiny": 0} for c in cs):
            return cs
        if time.monotonic() > end:
            raise AssertionError(f"slots still held: {cs}")
        time.sleep(0.2)


@dataclasses.dataclass
class Result:
    status: int
    ttft_s: float | None
    text: str
    retry_after: str | None


async def complete(http: httpx.AsyncClient, cfg, i: int, max_tokens: int) -> Result:
    """One streamed completion; status, time to its first token, text."""
    body = {"model": "tiny", "prompt": f"request number {i} says", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.monotonic()
    async with http.stream("POST", f"http://127.0.0.1:{cfg.endpoints.http_port}/v1/completions",
                           json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status_code != 200:
            await r.aread()
            return Result(r.status_code, None, r.text, r.headers.get("retry-after"))
        ttft, text = None, []
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                if ttft is None:
                    ttft = time.monotonic() - t0
                text.append(line)
        return Result(200, ttft, "".join(text), None)


def burst(cfg, n: int, max_tokens: int) -> list[Result]:
    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(complete(http, cfg, i, max_tokens) for i in range(n)))
    return asyncio.run(main())


def reconfigure(cfg, **changes) -> None:
    rcfg = dataclasses.replace(app.router_config(cfg), **changes)
    ray.get([get_router(index=i).reconfigure.remote(rcfg) for i in range(ROUTERS)])
    time.sleep(0.5)  # the replicas push again; the ingress sends its (empty) slot list


class RunningWatch:
    """Samples every decode replica's reported running batch while a burst
    runs: the most sequences any one replica ran at once."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            try:
                view = ray.get(get_router(index=0).replicas.remote(), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                view = {}
            for pools in view.values():
                for stats in pools.get("decode", []):
                    self.peak = max(self.peak, stats["running_seqs"])
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def test_a_burst_of_three_times_capacity_waits_and_completes(cluster):
    before = sum(c["queued_total"] for c in counters())
    with RunningWatch() as watch:
        results = burst(cluster, 3 * CAPACITY, max_tokens=24)
    # hand-offs that arrive at a full batch wait on the replica; none overfills it
    assert 0 < watch.peak <= 2, watch.peak
    assert [r.status for r in results] == [200] * (3 * CAPACITY), [r.text for r in results]
    cs = slots_settle()
    assert sum(c["queued_total"] for c in cs) - before >= CAPACITY  # the excess waited
    assert all(c["refusals"] == {} and c["unbalanced_releases"] == 0 for c in cs), cs


def test_a_short_queue_deadline_sheds_the_excess_with_429_and_spares_admitted_latency(cluster):
    # a full wave runs longer than the queue deadline on any machine: the
    # deadline is a fraction of the wave's measured time, so the excess
    # cannot be admitted before it passes however fast the host is
    t0 = time.monotonic()
    alone = burst(cluster, CAPACITY, max_tokens=WAVE_TOKENS)
    wave_s = time.monotonic() - t0
    assert [r.status for r in alone] == [200] * CAPACITY
    base_ttft = max(r.ttft_s for r in alone)
    reconfigure(cluster, max_queue_delay_s=min(0.5, wave_s / 3))
    try:
        results = burst(cluster, 3 * CAPACITY, max_tokens=WAVE_TOKENS)
    finally:
        reconfigure(cluster)
    ok = [r for r in results if r.status == 200]
    shed = [r for r in results if r.status == 429]
    assert len(ok) + len(shed) == len(results), [(r.status, r.text) for r in results]
    assert len(ok) >= CAPACITY and len(shed) >= CAPACITY, [r.status for r in results]
    assert all(r.retry_after and int(r.retry_after) >= 1 for r in shed)
    assert all("queue" in r.text for r in shed), shed[0].text
    # admitted requests did not queue behind the excess
    assert max(r.ttft_s for r in ok) <= 2 * base_ttft + 0.75, (base_ttft, [r.ttft_s for r in ok])
    slots_settle()


def test_clients_leaving_while_their_requests_wait_free_their_slots(cluster):
    md = [("authorization", f"Bearer {KEY}")]

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            # the pool is busy for a while: 3 rounds of long requests
            holders = [asyncio.ensure_future(complete(http, cluster, i, max_tokens=200))
                       for i in range(3 * CAPACITY)]
            await asyncio.sleep(0.5)
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{cluster.endpoints.grpc_port}") as ch:
                stub = pb_grpc.GenerationStub(ch)
                req = pb.GenerateRequest(model="tiny", text="waiting in line",
                                         params=pb.SamplingParams(max_tokens=8, temperature=0))

                async def leave_early() -> grpc.StatusCode:
                    try:
                        async for _ in stub.Generate(req, metadata=md, timeout=0.4):
                            pass
                        return grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as e:
                        return e.code()

                codes = await asyncio.gather(*(leave_early() for _ in range(6)))
            return codes, await asyncio.gather(*holders)

    codes, held = asyncio.run(main())
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= 3, codes
    assert [r.status for r in held] == [200] * len(held)
    cs = slots_settle()
    assert all(c["unbalanced_releases"] == 0 for c in cs), cs


def test_the_router_killed_under_load_loses_no_request_and_no_slot(cluster):
    standby_before = counters()[1]["decisions"]

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            tasks = [asyncio.ensure_future(complete(http, cluster, i, max_tokens=200))
                     for i in range(3 * CAPACITY)]
            await asyncio.sleep(0.5)
            ray.kill(get_router(index=0), no_restart=False)  # the model's router
            more = [asyncio.ensure_future(complete(http, cluster, 100 + i, max_tokens=8))
                    for i in range(CAPACITY)]
            return await asyncio.gather(*tasks, *more)

    results = asyncio.run(main())
    assert [r.status for r in results] == [200] * len(results), [r.text for r in results]
    cs = slots_settle(timeout_s=60)
    assert all(c["unbalanced_releases"] == 0 for c in cs), cs
    assert cs[1]["decisions"] > standby_before  # the standby placed what waited


def test_an_ingress_killed_mid_request_has_its_slots_expire(cluster):
    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            tasks = [asyncio.ensure_future(complete(http, cluster, i, max_tokens=160))
                     for i in range(2 * CAPACITY)]
            await asyncio.sleep(1.0)
            held = sum(c["in_flight"]["tiny"] for c in counters())
            [ingress] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["namespace"] == "serve" and "ingress" in a["name"]]
            ray.kill(ray.get_actor(ingress["name"], namespace="serve"), no_restart=True)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return held, results

    held, results = asyncio.run(main())
    assert held >= CAPACITY
    cs = slots_settle(timeout_s=30)  # lease_ttl_s is 2 s
    assert sum(c["leases_expired"] for c in cs) >= CAPACITY, cs
    # Serve replaces the ingress; the cluster serves again
    end = time.monotonic() + 90
    while True:
        r = burst(cluster, 1, max_tokens=4)[0] if _http_up(cluster) else None
        if r is not None and r.status == 200:
            break
        assert time.monotonic() < end, r
        time.sleep(1.0)
    slots_settle()


def _http_up(cfg) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{cfg.endpoints.http_port}/health",
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_choices_that_do_not_fit_get_429_without_a_stream_and_free_their_slots(cluster):
    # n choices are admitted all or none: one more than the limit is refused
    # whole, at once, and holds nothing; a request that fits is served right after
    url = f"http://127.0.0.1:{cluster.endpoints.http_port}/v1/completions"
    body = {"model": "tiny", "prompt": "all or none", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "stream": True}
    reconfigure(cluster, max_queue_per_model=CAPACITY)
    try:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as http:
            t0 = time.monotonic()
            with http.stream("POST", url, json={**body, "n": CAPACITY + 1}) as r:
                refused = (r.status_code, r.headers.get("retry-after"),
                           r.headers.get("content-type"), r.read())
            refused_s = time.monotonic() - t0
            with http.stream("POST", url, json={**body, "n": CAPACITY}) as r:
                served = r.status_code, [line for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        reconfigure(cluster)
    status, retry_after, content_type, text = refused
    assert status == 429 and int(retry_after) >= 1, text
    assert content_type.startswith("application/json") and b"data:" not in text, text
    assert b"choices need" in text and refused_s < 5.0, (text, refused_s)
    assert served[0] == 200 and served[1][-1] == "data: [DONE]", served
    finished = {c["index"] for line in served[1][:-1] for c in json.loads(line[6:])["choices"]
                if c.get("finish_reason")}
    assert finished == set(range(CAPACITY)), served
    cs = slots_settle()
    assert all(c["unbalanced_releases"] == 0 for c in cs), cs
