"""Placements per second through the path an ingress uses: router actors
on a local Ray node, ingress processes (actors) each running 32 async
callers that place a request and release it, over and over.

Run by ``bench_router.py --actor-path``. Per configuration, fresh router
actors are loaded with the workload's replicas and cached prefixes; a
pusher actor sends every replica's stats to every router each stats
period, as workers do (``RouterFanout``). Configurations, alternated within
each run:

  per-request calls  one actor call to place and one to release each
                     request, and one per stats push (the round trips of
                     the path before exchanges)
  exchange           RouterClient: calls, releases and heartbeats batched
                     into one exchange per round trip per router, over each
                     router's stream (``router_stream``), as are the pushes
  exchange, actor calls   the same, each exchange and each stats push one
                     Ray actor call (the path before the routers' streams,
                     and their fallback)
with 1 or 2 routers (the 2 models of the workload on different routers)
and 1 or 2 ingress processes, and one ingress of 128 callers (an ingress
with more requests in flight batches more per round trip). Each caller
waits for its placement before it asks again, so with C callers the rate
is at most C / the round-trip latency. placements/s = placements completed in the
measured window / its length; latency is that of ``place`` alone. On a
shared machine the wall-clock rate moves with everyone else's load, so
each run also reports the CPU seconds the router and ingress processes
spent in the window (all their threads, Ray's included):
placements per router CPU-second is what one dedicated core per router
would sustain.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import msgspec
import ray

from splitserve.cluster.serve.router_actor import RouterActor
from splitserve.cluster.serve.router_client import RouterClient
from splitserve.cluster.serve.router_fanout import RouterFanout
from splitserve.cluster.serve.router_names import router_order
from splitserve.engine.roles import Role
from splitserve.engine.stats import DecodeStats, EngineLoad, PrefillStats
from splitserve.router.config import RouterConfig
from splitserve.router.exchange import Exchange, LeaseEnd, RouteCall
from splitserve.router.reports import ReplicaInfo, StatsReport
from splitserve.router.types import DecodeReplicaStats, Placement, RouteRequest, RouterError

STATS_PERIOD_S = 0.25
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass(frozen=True)
class Config:
    label: str
    routers: int
    ingresses: int
    batched: bool
    callers: int | None = None  # per ingress; None: the run's --callers
    stream: bool = True  # exchanges over the routers' streams, else actor calls


CONFIGS = (
    Config("per-request calls, 1 router, 1 ingress", 1, 1, False, stream=False),
    Config("exchange, actor calls, 1 router, 1 ingress", 1, 1, True, stream=False),
    Config("exchange, 1 router, 1 ingress", 1, 1, True),
    Config("exchange, 2 routers, 1 ingress", 2, 1, True),
    Config("exchange, 1 router, 2 ingresses", 1, 2, True),
    Config("exchange, 2 routers, 2 ingresses", 2, 2, True),
    Config("exchange, 1 router, 1 ingress, 128 callers", 1, 1, True, 128),
)


def report_of(s, stored: tuple[int, ...]) -> StatsReport:
    """The StatsReport a worker with these stats would push (its whole cache)."""
    base = dict(running=0, waiting=0, max_seqs=1, free_blocks=1, total_blocks=1, block_size=16,
                busy_time_s=1.0, steps=1, prompt_tokens_computed=0, preemptions=0,
                prefix_hits=0, prefix_queries=0, cached_blocks=len(stored), open_requests=0,
                block_owners=0, pending_prompt_tokens=0)
    if isinstance(s, DecodeReplicaStats):
        load = EngineLoad(**{**base, "running": s.running_seqs, "waiting": s.waiting_requests,
                             "max_seqs": s.max_seqs, "free_blocks": s.free_blocks,
                             "total_blocks": s.total_blocks, "block_size": s.block_size,
                             "busy_time_s": s.decode_step_s * 100, "steps": 100})
        stats, role = DecodeStats(engine=load, streams=0, reservations=0, handoffs=0,
                                  local_prefills=0, fallbacks=0, refused=0, expired=0,
                                  handoff_bytes=0, kv_endpoint=""), Role.DECODE
    else:
        load = EngineLoad(**{**base, "pending_prompt_tokens": s.pending_prompt_tokens,
                             "prompt_tokens_computed": int(s.prefill_tokens_per_s)})
        stats, role = PrefillStats(engine=load, streams=0, inflight=0, completed=0, failed=0,
                                   bytes_sent=0), Role.PREFILL
    info = ReplicaInfo(replica_id=s.replica_id, role=role, model=s.model, kv_endpoint="",
                       node_id=s.node_id)
    return StatsReport(replica=info, stats=stats, healthy=True, draining=False,
                       updated_at=time.time(), stored=stored, evicted=(), snapshot=True)


@ray.remote(num_cpus=0)
class Pusher:
    """Every replica's stats to every router once per stats period, each
    replica through a RouterFanout of its own, as workers push (over the
    routers' streams, or with ``stream`` False as actor calls)."""

    def __init__(self, routers: list, reports: list[StatsReport], stream: bool = True):
        self.routers, self.reports = routers, reports
        self.fanouts = [RouterFanout(len(routers), handles=routers, stream=stream, timeout_s=5.0)
                        for _ in reports]
        self.pushes = 0

    async def run(self, seconds: float) -> int:
        """Pushes after the first (whole-cache) one: deltas, here empty."""
        end = time.monotonic() + seconds
        deltas = [msgspec.structs.replace(r, stored=(), snapshot=False) for r in self.reports]
        while time.monotonic() < end:
            t = time.monotonic()
            await asyncio.gather(*(f.push(msgspec.structs.replace(r, updated_at=time.time()))
                                   for f, r in zip(self.fanouts, deltas)))
            self.pushes += len(deltas) * len(self.routers)
            await asyncio.sleep(max(0.0, STATS_PERIOD_S - (time.monotonic() - t)))
        for f in self.fanouts:
            f.close()
        return self.pushes


@ray.remote(num_cpus=0)
class IngressSim:
    """One ingress process: ``callers`` coroutines placing and releasing."""

    async def run(self, routers: list, models: list[str], requests: list, callers: int,
                  warmup_s: float, measure_s: float, batched: bool,
                  router_pids: list[int], stream: bool = True) -> dict:
        client = RouterClient(len(routers), STATS_PERIOD_S, models=models, handles=routers,
                              stream=stream)
        holder = f"bench-{os.getpid()}"
        t0 = time.perf_counter()
        start, end = t0 + warmup_s, t0 + warmup_s + measure_s
        lat: list[float] = []
        refused = 0

        async def per_request(lease: str, req: RouteRequest) -> object:
            h = routers[router_order(req.model, len(routers), models)[0]]
            now = time.time()
            call = RouteCall(lease_id=lease, request=req, arrival=now, waiting_since=now)
            reply = await h.exchange.remote(Exchange(holder=holder, calls=(call,)))
            out = reply.outcomes[0]
            if isinstance(out, Placement):
                await h.exchange.remote(Exchange(holder=holder, releases=(LeaseEnd(lease, 64),)))
            return out

        async def caller(k: int) -> None:
            nonlocal refused
            i = k
            while (now := time.perf_counter()) < end:
                model, hashes, plen, max_tokens = requests[i % len(requests)]
                i += callers
                lease = client.new_lease()
                req = RouteRequest(lease, model, plen, max_tokens, block_hashes=hashes)
                if batched:
                    try:
                        out = await client.place(lease, req, arrival=time.time())
                    except RouterError as e:
                        out = e
                    finally:
                        client.release(lease, 64)
                else:
                    out = await per_request(lease, req)
                done = time.perf_counter()
                if start <= done < end:
                    if isinstance(out, Placement):
                        lat.append(done - now)
                    else:
                        refused += 1

        async def cpu_window() -> tuple[float, float]:
            """CPU seconds of this process and of the routers in the window."""
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            c0, r0 = time.process_time(), sum(cpu_seconds(p) for p in router_pids)
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            return time.process_time() - c0, sum(cpu_seconds(p) for p in router_pids) - r0

        (cpu, router_cpu), *_ = await asyncio.gather(cpu_window(),
                                                     *(caller(k) for k in range(callers)))
        await client.close()
        lat.sort()
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else 0.0  # noqa: E731
        return {"placements": len(lat), "refused": refused, "p50_ms": pick(0.5),
                "p99_ms": pick(0.99), "exchanges": client.counts["exchanges"],
                "stream_exchanges": client.counts["stream_exchanges"], "cpu_s": cpu,
                "router_cpu_s": router_cpu}


def measure(cfg: Config, router_cfg: RouterConfig, reports: list[StatsReport], requests: list,
            models: list[str], callers: int, warmup_s: float, measure_s: float) -> dict:
    routers = [RouterActor.remote(router_cfg) for _ in range(cfg.routers)]
    ray.get([r.ready.remote() for r in routers])
    # every replica's first push, its whole cache, before the clock starts
    ray.get([r.update_stats.remote(msgspec.structs.replace(rep, updated_at=time.time()))
             for rep in reports for r in routers])
    pusher = Pusher.remote(routers, reports, cfg.stream)
    pushing = pusher.run.remote(warmup_s + measure_s + 1.0)
    sims = [IngressSim.remote() for _ in range(cfg.ingresses)]
    pids = ray.get([r.__ray_call__.remote(lambda self: os.getpid()) for r in routers])
    ray.get([s.__ray_call__.remote(lambda self: None) for s in sims])  # all started
    outs = ray.get([s.run.remote(routers, models, requests, callers, warmup_s, measure_s,
                                 cfg.batched, pids, cfg.stream) for s in sims])
    router_cpu = outs[0]["router_cpu_s"]  # over the first ingress's window
    pushes = ray.get(pushing)
    counters = ray.get([r.counters.remote() for r in routers])
    for a in (*sims, pusher, *routers):
        ray.kill(a)
    placed = sum(o["placements"] for o in outs)
    return {"config": cfg.label, "routers": cfg.routers, "ingresses": cfg.ingresses,
            "callers_per_ingress": callers,
            "batched": cfg.batched, "stream": cfg.batched and cfg.stream,
            "exchanges": sum(o["exchanges"] for o in outs),
            "stream_exchanges": sum(o["stream_exchanges"] for o in outs),
            "placements_per_s": placed / measure_s,
            "p50_ms": max(o["p50_ms"] for o in outs), "p99_ms": max(o["p99_ms"] for o in outs),
            "refused": sum(o["refused"] for o in outs), "stats_pushes": pushes,
            "router_cpu_s": router_cpu, "ingress_cpu_s": sum(o["cpu_s"] for o in outs),
            "per_router_cpu_s": placed / max(router_cpu, 1e-9),
            "per_ingress_cpu_s": placed / max(sum(o["cpu_s"] for o in outs), 1e-9),
            "load_avg_1m": os.getloadavg()[0],
            "in_flight_after": [c["in_flight"] for c in counters],
            "unbalanced_releases": sum(c["unbalanced_releases"] for c in counters)}


def run_all(router_cfg: RouterConfig, replicas: list, cached: list, requests: list,
            callers: int, runs: int, warmup_s: float, measure_s: float,
            configs=CONFIGS) -> list[dict]:
    by_replica: dict[str, list[int]] = {}
    for rid, hashes in cached:
        by_replica.setdefault(rid, []).extend(hashes)
    reports = [report_of(s, tuple(by_replica.get(s.replica_id, ()))) for s in replicas]
    models = list(router_cfg.models)
    results = []
    for run in range(runs):
        for cfg in configs:
            r = measure(cfg, router_cfg, reports, requests, models, cfg.callers or callers,
                        warmup_s, measure_s)
            r["run"] = run
            results.append(r)
            print(f"run {run}  {cfg.label:46s} {r['placements_per_s']:9,.0f} placements/s  "
                  f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                  f"per CPU-s: router {r['per_router_cpu_s']:7,.0f} ingress "
                  f"{r['per_ingress_cpu_s']:7,.0f}  refused {r['refused']}  "
                  f"load {r['load_avg_1m']:.1f}", flush=True)
    return results
