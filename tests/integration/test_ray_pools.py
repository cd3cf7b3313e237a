"""Prefill and decode pools as Ray Serve deployments on a real local Ray
cluster: token parity through the pools, and replica deaths survived."""

import asyncio
import time

import pytest
import ray

from splitserve.cluster.serve import app
from splitserve.cluster.serve.orchestrator import ClusterBackend
from splitserve.cluster.config import parse_config
from splitserve.engine.stats import stats_from_wire
from splitserve.handoff.rpc import WorkerClient
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.pd_harness import make_engine
from tests.integration.ray_cluster import local_ray

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def config(path, transport="grpc", decode_replicas=2):
    return parse_config({
        "models": [{"model": {"name": "tiny", "path": str(path), "num_blocks": 96, "block_size": 4},
                    "prefill": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5},
                    "decode": {"min_replicas": decode_replicas, "max_replicas": decode_replicas,
                               "num_cpus": 0.5}}],
        # never prefill on decode unless the prefill pool is unusable
        "router": {"local_prefill_max_tokens": 0, "stats_period_s": 0.1, "stats_ttl_s": 2.0},
        "transfer": {"transport": transport},
        "auth": {"cluster_token": "ray-test-token"},
    })


@pytest.fixture(scope="module")
def cluster():
    with local_ray(num_cpus=4):
        yield


def prompt_set(vocab):
    return [[(13 * i + j) % vocab for j in range(n)] for i, n in enumerate((3, 7, 12, 20, 33, 5))]


async def run_all(be, ps, params=GREEDY):
    async def one(i, p):
        toks, first = [], None
        async for d in be.generate("tiny", f"req-{i}", p, params):
            toks += d["token_ids"]
            first = first or d
        return toks, first
    return await asyncio.gather(*[one(i, p) for i, p in enumerate(ps)])


async def pool_free(addresses, token):
    out = {}
    for a in addresses:
        c = WorkerClient(a, token)
        try:
            s = await c.call("Stats", {}, timeout=10)
            out[a] = stats_from_wire(s).idle() or s  # the stats themselves when not idle
        finally:
            await c.close()
    return out


def replica_addresses():
    reps = ray.get(app.get_router().replicas.remote())["tiny"]
    ids = [r["replica_id"] for r in reps["prefill"]], [r["replica_id"] for r in reps["decode"]]
    assert all(i.startswith("127.0.0.1:") for i in ids[0] + ids[1]), ids  # loopback only
    return ids


# grpc last: the next test deploys the grpc config, which then changes nothing
# (no replica is rebuilt); each transport's run still replaces the other's
@pytest.mark.parametrize("transport", ["torch_dist", "grpc"])
def test_pools_match_single_engine(cluster, tiny_llama, transport):
    cfg = config(tiny_llama, transport)
    app.deploy(cfg, with_ingress=False, wait_s=180)
    ref = make_engine(tiny_llama, block_size=4)
    ps = prompt_set(ref.model_cfg.vocab_size)
    want = [r.token_ids for r in ref.generate(ps, GREEDY)]
    be = ClusterBackend(cfg)

    async def main():
        got = await run_all(be, ps)
        assert [g[0] for g in got] == want
        assert all(g[1]["timings"]["mode"] == "remote" for g in got)
        assert all(g[1]["placement"]["prefill"] for g in got)
        # replicas replaced by this deploy (the previous transport's) drain
        # and deregister on their own time: wait for them to leave
        deadline = time.monotonic() + 30
        pre, dec = replica_addresses()
        while (len(pre), len(dec)) != (1, 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            pre, dec = replica_addresses()
        assert len(pre) == 1 and len(dec) == 2, (pre, dec)
        idle = await pool_free(pre + dec, cfg.cluster_token())
        assert all(v is True for v in idle.values()), idle
        await be.close()
    asyncio.run(main())


async def alive(address, token):
    c = WorkerClient(address, token)
    try:
        await c.call("Stats", {}, timeout=3)
        return True
    except Exception:
        return False
    finally:
        await c.close()


def test_decode_replica_killed_requests_move(cluster, tiny_llama):
    cfg = config(tiny_llama)
    app.deploy(cfg, with_ingress=False, wait_s=180)
    ref = make_engine(tiny_llama, block_size=4)
    ps = prompt_set(ref.model_cfg.vocab_size)
    want = [r.token_ids for r in ref.generate(ps, GREEDY)]
    _, before = replica_addresses()
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if "tiny-decode" in a["name"] and a["namespace"] == "serve"]
    assert len(victims) == 2
    ray.kill(ray.get_actor(victims[0]["name"], namespace="serve"), no_restart=True)
    be = ClusterBackend(cfg)

    async def main():
        for _ in range(50):  # ray.kill returns before the process is gone
            up = [a for a in before if await alive(a, cfg.cluster_token())]
            if len(up) == 1:
                break
            await asyncio.sleep(0.2)
        assert len(up) == 1, up
        # the dead replica's stats are still fresh in the router: requests
        # placed on it are refused and placed again, none is lost
        got = await run_all(be, ps * 2)
        assert [g[0] for g in got] == want * 2
        assert {g[1]["placement"]["decode"] for g in got} == set(up)
        await be.close()
    asyncio.run(main())
    # Serve replaces the replica and the pool is back to two
    deadline = time.monotonic() + 120
    while len(replica_addresses()[1]) != 2 or set(replica_addresses()[1]) == set(before):
        assert time.monotonic() < deadline, "decode replica was not replaced"
        time.sleep(0.2)
    app.shutdown()
