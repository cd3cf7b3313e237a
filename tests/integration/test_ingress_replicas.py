"""Several ingress replicas on a real local Ray cluster: HTTP through
Serve's proxy and gRPC on one shared port both answer; one replica killed
under load loses only the requests it was serving, new requests succeed
once Serve has replaced it (in the moment before Serve's proxy or the
kernel notices the death, a new request may still reach the dead replica:
those are counted and printed, not hidden), and its admission slots expire
at the routers (``router.lease_ttl_s``)."""

import asyncio
import os
import time

import grpc
import httpx
import pytest
import ray
from ray import serve

from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.cluster.serve.router_actor import get_router
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.slow

KEY = "sk-ingress-replicas"
MD = (("authorization", f"Bearer {KEY}"),)
ROUTERS = 2
LEASE_TTL_S = 2.0
HTTP_STREAMS, GRPC_STREAMS = 10, 4


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    cfg = parse_config({
        "models": [{"model": {"name": "tiny", "path": str(tiny_llama), "num_blocks": 512,
                              "block_size": 4, "max_num_seqs": 32},
                    "mode": "colocated",
                    "decode": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}}],
        "router": {"routers": ROUTERS, "stats_period_s": 0.1, "stats_ttl_s": 2.0,
                   "lease_ttl_s": LEASE_TTL_S},
        "auth": {"api_keys": [KEY], "cluster_token": "ingress-replicas-token"},
        "endpoints": {"http_port": free_port(), "grpc_port": free_port(), "ingress_replicas": 2},
    })
    with local_ray(num_cpus=4):
        app.deploy(cfg, wait_s=240)
        yield cfg


def ingress_replicas() -> dict[int, object]:
    """pid -> actor handle of each running ingress replica."""
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::ingress#ingress#"):
            try:
                h = ray.get_actor(a["name"], namespace=a["namespace"])
                out[ray.get(h.__ray_call__.remote(lambda self: os.getpid()), timeout=10)] = h
            except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # gone meanwhile
    return out


def running_ingress_replicas() -> int:
    st = serve.status().applications["ingress"].deployments["ingress"]
    return st.replica_states.get("RUNNING", 0)


def router_counters() -> list[dict]:
    return [ray.get(get_router(index=i).counters.remote()) for i in range(ROUTERS)]


def http_url(cfg, path="/v1/completions") -> str:
    return f"http://127.0.0.1:{cfg.endpoints.http_port}{path}"


async def http_stream(http: httpx.AsyncClient, cfg, i: int, started: asyncio.Event | None,
                      max_tokens: int) -> bool:
    """One streamed completion; True when it ran to its end ([DONE])."""
    body = {"model": "tiny", "prompt": f"stream {i}", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        async with http.stream("POST", http_url(cfg), json=body,
                               headers={"Authorization": f"Bearer {KEY}"}) as r:
            if r.status_code != 200:
                return False
            async for line in r.aiter_lines():
                if started is not None and line.startswith("data: {"):
                    started.set()
                if line == "data: [DONE]":
                    return True
    except httpx.HTTPError:
        pass
    return False


async def grpc_stream(cfg, i: int, started: asyncio.Event | None, max_tokens: int) -> bool:
    """One streamed gRPC generation on its own connection; True when it finished."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}") as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(model="tiny", text=f"grpc stream {i}",
                                 params=pb.SamplingParams(max_tokens=max_tokens, temperature=0,
                                                          ignore_eos=True))
        try:
            async for out in stub.Generate(req, metadata=MD, timeout=120):
                if started is not None:
                    started.set()
                if out.finish_reason:
                    return out.finish_reason == "length"
        except grpc.aio.AioRpcError:
            pass
    return False


def test_http_and_grpc_answer_on_both_replicas(cluster):
    assert running_ingress_replicas() == 2 and len(ingress_replicas()) == 2

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(
                *(http_stream(http, cluster, i, None, 4) for i in range(8)),
                *(grpc_stream(cluster, i, None, 4) for i in range(8)))

    assert all(asyncio.run(main()))
    # each replica holds its own slots: two lease holders were heard from
    holders = {h for c in router_counters() for h in c["slots_by_holder"]}
    assert len({h.rsplit(":", 1)[0] for h in holders}) <= 2  # node:pid of each replica


def test_a_replica_killed_under_load(cluster):
    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            started = [asyncio.Event() for _ in range(HTTP_STREAMS + GRPC_STREAMS)]
            load = [asyncio.ensure_future(http_stream(http, cluster, i, started[i], 200))
                    for i in range(HTTP_STREAMS)]
            load += [asyncio.ensure_future(grpc_stream(cluster, i, started[HTTP_STREAMS + i], 200))
                     for i in range(GRPC_STREAMS)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            # which replica holds which slots: the model's router counts them per holder
            held = router_counters()[0]["slots_by_holder"]
            replicas = ingress_replicas()
            by_pid = {int(h.split(":")[1]): n for h, n in held.items()}
            victim = max(replicas, key=lambda pid: by_pid.get(pid, 0))
            on_victim = by_pid.get(victim, 0)
            on_survivor = sum(n for pid, n in by_pid.items() if pid != victim)
            assert on_victim + on_survivor == len(load)
            ray.kill(replicas[victim], no_restart=True)  # Serve starts a new one
            killed_at = time.monotonic()

            # new requests while Serve replaces it, then after
            after: list[tuple[float, str, bool, bool]] = []  # (s after the kill, when, http, grpc)
            replaced_at = None
            while replaced_at is None or time.monotonic() < replaced_at + 3.0:
                sent = time.monotonic()
                ok_http = await http_stream(http, cluster, 1000 + len(after), None, 2)
                ok_grpc = await grpc_stream(cluster, 1000 + len(after), None, 2)
                after.append((sent - killed_at, "gap" if replaced_at is None else "replaced",
                              ok_http, ok_grpc))
                if replaced_at is None and running_ingress_replicas() == 2:
                    now_running = ingress_replicas()
                    if len(now_running) == 2 and victim not in now_running:
                        replaced_at = time.monotonic()
                assert time.monotonic() - killed_at < 120, "the ingress was not replaced"
            finished = await asyncio.gather(*load)
            return on_victim, on_survivor, finished, after, replaced_at - killed_at

    on_victim, on_survivor, finished, after, replaced_s = asyncio.run(main())
    # every request the surviving replica served ran to its end
    assert sum(finished) >= on_survivor, (on_victim, on_survivor, finished)
    gap = [a for a in after if a[1] == "gap"]
    failed_in_gap = [(round(t, 2), h, g) for t, _, h, g in gap if not (h and g)]
    print(f"in flight: {on_victim} on the killed replica, {on_survivor} on the other; "
          f"{sum(finished)} finished; new HTTP+gRPC pairs until replaced: {len(gap)}, failed "
          f"(s after the kill, http ok, grpc ok) {failed_in_gap}; replaced after "
          f"{replaced_s:.1f} s")
    # while Serve replaces it, the surviving replica serves
    assert any(h and g for _, _, h, g in gap), gap
    # once it is replaced, every new request succeeds
    assert all(h and g for _, when, h, g in after if when == "replaced"), after
    # the killed replica's slots expire at the routers; none is left held
    deadline = time.monotonic() + LEASE_TTL_S + 20
    while True:
        cs = router_counters()
        if all(c["in_flight"] == {"tiny": 0} for c in cs):
            break
        assert time.monotonic() < deadline, cs
        time.sleep(0.2)
    if on_victim:
        assert cs[0]["leases_expired"] >= on_victim, cs[0]
