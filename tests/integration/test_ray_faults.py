"""Faults on a real local Ray cluster (1 prefill + 2 decode replicas): a
poisoned request fails alone and is moved at most once while the streams
beside it finish with their reference tokens; under a CI-scale soak (with
poisoned requests mixed in) the decode replicas' resident memory levels off
and every block pool returns to its baseline.

The poison is a worker setup hook (``tests.integration.poison_hook``) that
this test cluster's worker processes run at start."""

import asyncio
import time
from pathlib import Path

import pytest
import ray

from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.cluster.serve.orchestrator import ClusterBackend
from splitserve.engine.errors import RequestFailedError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.stats import stats_from_wire
from splitserve.handoff.rpc import WorkerClient
from tests.integration.pd_harness import make_engine
from tests.integration.poison_hook import HOOK, POISON
from tests.integration.ray_cluster import local_ray

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def config(path):
    return parse_config({
        "models": [{"model": {"name": "tiny", "path": str(path), "num_blocks": 128,
                              "block_size": 4, "max_num_seqs": 32},
                    "prefill": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5},
                    "decode": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5}}],
        "router": {"local_prefill_max_tokens": 0, "stats_period_s": 0.1, "stats_ttl_s": 2.0},
        "auth": {"cluster_token": "ray-faults-token"},
    })


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    cfg = config(tiny_llama)
    with local_ray(num_cpus=4, worker_setup_hook=HOOK):
        app.deploy(cfg, with_ingress=False, wait_s=180)
        yield cfg


def prompts(vocab, n, seed=0):
    return [[(31 * (i + seed) + 7 * j) % vocab or 5 for j in range(3 + (i * 5) % 17)]
            for i in range(n)]


def replicas():
    reps = ray.get(app.get_router().replicas.remote())["tiny"]
    return ([r["replica_id"] for r in reps["prefill"]], [r["replica_id"] for r in reps["decode"]])


async def worker_stats(address, token):
    c = WorkerClient(address, token)
    try:
        return stats_from_wire(await c.call("Stats", {}, timeout=10))
    finally:
        await c.close()


async def pools_at_baseline(cfg, timeout=15.0) -> dict:
    """Every replica idle with all its blocks free; returns the last stats
    of those that are not, or {} once all are."""
    pre, dec = replicas()
    end = time.monotonic() + timeout
    while True:
        busy = {}
        for a in pre + dec:
            s = await worker_stats(a, cfg.cluster_token())
            if not (s.idle() and s.engine.free_blocks == s.engine.total_blocks):
                busy[a] = s
        if not busy or time.monotonic() > end:
            return busy
        await asyncio.sleep(0.2)


async def one(be, rid, prompt):
    toks = []
    async for d in be.generate("tiny", rid, prompt, GREEDY):
        toks += d["token_ids"]
    return toks


async def poisoned(be, rid):
    seen = []
    try:
        async for d in be.generate("tiny", rid, POISON + [rid.__hash__() % 50 + 3], GREEDY):
            seen += d["token_ids"]
    except RequestFailedError as e:
        return seen, e
    return seen, None


def test_a_poisoned_request_fails_alone_through_the_pools(cluster, tiny_llama):
    ref = make_engine(tiny_llama, block_size=4)
    ps = prompts(ref.model_cfg.vocab_size, 8)
    want = [r.token_ids for r in ref.generate(ps, GREEDY)]
    before = replicas()
    be = ClusterBackend(cluster)

    async def main():
        got = await asyncio.gather(*[one(be, f"good-{i}", p) for i, p in enumerate(ps)],
                                   poisoned(be, "poison"))
        *good, (seen, err) = got
        assert good == want
        assert isinstance(err, RequestFailedError) and "failed on 2 decode replicas" in str(err)
        assert len(seen) == 4  # two tokens on each replica it met, none repeated
        assert (be.counters["faults"], be.counters["failed"]) == (2, 1)
        assert await pools_at_baseline(cluster) == {}
        # no replica was lost: the same ones serve the next request
        assert replicas() == before
        assert await one(be, "after", ps[0]) == want[0]
        await be.close()
    asyncio.run(main())


def decode_processes() -> list[int]:
    """Pids of this cluster's decode replicas (Ray titles them
    ``ray::ServeReplica:<app>:<deployment>``; assumes no other Ray cluster on
    the machine runs an app of that name)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica" in cmd and "tiny-decode" in cmd:
            pids.append(int(d.name))
    return pids


def proc_status(pid: int) -> tuple[float, int]:
    """(resident MiB, threads) of a process."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys over their index."""
    n = len(ys)
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def test_soak_decode_memory_levels_off_and_pools_return_to_baseline(cluster, tiny_llama):
    """56 waves of 12 concurrent streams (one of them poisoned), each wave
    ending with every pool back at its baseline. After 8 waves of warm-up,
    each decode replica's RSS grows by less than 100 KiB per wave (least
    squares; about 20 KiB measured, allocator noise) and its thread count
    stays flat."""
    vocab = make_engine(tiny_llama, block_size=4).model_cfg.vocab_size
    be = ClusterBackend(cluster)
    procs = decode_processes()
    assert len(procs) == 2, procs
    warmup, waves = 8, 48
    rss: list[list[float]] = []
    threads: list[list[int]] = []

    async def main():
        for w in range(warmup + waves):
            ps = prompts(vocab, 11, seed=w)
            out = await asyncio.gather(*[one(be, f"w{w}-{i}", p) for i, p in enumerate(ps)],
                                       poisoned(be, f"w{w}-poison"))
            assert all(len(t) == GREEDY.max_tokens for t in out[:-1])
            assert isinstance(out[-1][1], RequestFailedError)
            assert await pools_at_baseline(cluster) == {}
            status = [proc_status(p) for p in procs]
            rss.append([m for m, _ in status])
            threads.append([t for _, t in status])
        await be.close()
    t0 = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - t0
    for r in range(len(procs)):
        series = [s[r] for s in rss[warmup:]]
        growth = slope(series)
        assert growth < 0.1, (f"decode replica {r} RSS grows {growth:.2f} MiB/wave after "
                               f"warm-up: {[round(x, 1) for x in series]} ({elapsed:.0f}s)")
        assert max(t[r] for t in threads[warmup:]) <= threads[warmup][r] + 4, threads
    assert be.counters["failed"] == warmup + waves
