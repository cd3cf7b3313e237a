"""Router decision speed on one core: every policy over a 256-replica cluster
with 10k cached prefixes, prompts hashed by the ingress or by the router.

    .venv/bin/python benchmarks/bench_router.py --requests 10000 --out bench_router.json

Cluster: 2 models x (64 prefill + 64 decode) replicas on 32 nodes, stats
drawn once per replica (queues, free blocks, batch sizes vary; measured
prefill speeds within +-5%, as on one GPU type). Cache: 200 system prompts
(256-1024 tokens), each with a home set of 4 prefill and 4 decode replicas
of its model, and 10k conversations (system prompt + 64-768 tokens of
history) cached on one prefill and one decode replica of that home set, one
in ten also on a random replica elsewhere: the steady state prefix-aware
routing leads to. Requests: 80% continue a cached conversation with a
32-512 token turn, 10% open a new conversation on a known system prompt,
10% are unrelated; 64-1024 new tokens each.

Each iteration is what the router actor does per request: admit, route,
release, and every 8th request one replica's stats push (each replica
pushes every ~100 ms at 20k requests/s). decisions/s = requests / time of
that work; latency percentiles are of route() alone. Both are reported in
thread CPU time (what a dedicated core would see; the headline) and in wall
time (which on a shared machine also counts other processes' turns).
Modes: "precomputed" passes block hashes computed off the router (by the
ingress), "tokens" passes token ids and the router hashes them. Requests
are built before their clock starts. ``--gc-freeze`` moves the setup's
objects out of the collector's reach first (``gc.freeze()``).

``--actor-path`` measures instead what the cluster sustains: placements/s
through router actors on a local Ray node, from ingress processes of 32
async callers each, with one actor call per route and per release (the
old path's round trips) and with batched exchanges (RouterClient), for 1
and 2 routers and ingresses, alternated, ``--runs`` times; the in-process
RouterCore rate on the same workload is the reference beside it
(``benchmarks/router_actor_path.py``):

    .venv/bin/python benchmarks/bench_router.py --actor-path --runs 3 --out actor.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitserve.cluster.bench.record import write_json  # noqa: E402
from splitserve.engine.hashing import block_hashes  # noqa: E402
from splitserve.router.config import ModelFacts, RouterConfig  # noqa: E402
from splitserve.router.core import RouterCore  # noqa: E402
from splitserve.router.policies import POLICIES  # noqa: E402
from splitserve.router.types import (  # noqa: E402
    DecodeReplicaStats,
    NoCapacityError,
    PrefillReplicaStats,
    RouteRequest,
)

MODELS = {"llama-3-8b": 131072, "qwen2-7b": 57344}  # KV bytes per token (bf16)
BLOCK = 16
VOCAB = 32000
TARGET_DECISIONS_PER_S = 20000.0
TARGET_P99_US = 1000.0
PUSH_EVERY = 8
MODES = ("precomputed", "tokens")


@dataclasses.dataclass
class Workload:
    replicas: list  # baseline stats of every replica
    cached: list[tuple[str, tuple[int, ...]]]  # (replica id, block hashes) events to replay
    requests: list[tuple[str, tuple[int, ...], tuple[int, ...], int]]  # model, tokens, hashes, max_tokens


def build_workload(seed: int, n_requests: int, n_prefixes: int, per_pool: int = 64) -> Workload:
    rng = random.Random(seed)
    vocab = list(range(VOCAB))  # shared int objects keep token tuples small
    words = lambda n: tuple(rng.choices(vocab, k=n))  # noqa: E731
    replicas: list = []
    pools: dict[str, tuple[list[str], list[str]]] = {}
    now = time.time()
    for m, model in enumerate(MODELS):
        prefill_ids, decode_ids = [], []
        for i in range(per_pool):
            node = f"node-{(i % 16) + 16 * m:02d}"
            pid, did = f"{model}/prefill-{i:02d}", f"{model}/decode-{i:02d}"
            prefill_ids.append(pid)
            decode_ids.append(did)
            replicas.append(PrefillReplicaStats(
                replica_id=pid, model=model, pending_prompt_tokens=rng.randint(0, 20000),
                running_requests=rng.randint(0, 16), prefill_tokens_per_s=rng.uniform(19000, 21000),
                node_id=node, updated_at=now))
            replicas.append(DecodeReplicaStats(
                replica_id=did, model=model, free_blocks=rng.randint(8000, 18000), total_blocks=20000,
                running_seqs=rng.randint(16, 160), max_seqs=256, block_size=BLOCK,
                waiting_requests=rng.randint(0, 4), decode_step_s=rng.uniform(0.02, 0.04),
                prefill_tokens_per_s=8000.0, node_id=node, updated_at=now))
        pools[model] = (prefill_ids, decode_ids)

    systems = []  # (model, tokens, home prefill ids, home decode ids)
    for s in range(200):
        model = list(MODELS)[s % len(MODELS)]
        prefill_ids, decode_ids = pools[model]
        systems.append((model, words(rng.randint(256, 1024)),
                        rng.sample(prefill_ids, 4), rng.sample(decode_ids, 4)))
    conversations = []  # (system index, tokens)
    cached: list[tuple[str, tuple[int, ...]]] = []
    for _ in range(n_prefixes):
        s = rng.randrange(len(systems))
        model, system, home_p, home_d = systems[s]
        tokens = system + words(rng.randint(64, 768))
        hashes = tuple(block_hashes(tokens, BLOCK))
        holders = [rng.choice(home_p), rng.choice(home_d)]
        if rng.random() < 0.1:
            holders.append(rng.choice(pools[model][rng.randrange(2)]))
        cached += [(rid, hashes) for rid in holders]
        conversations.append((s, tokens))

    requests = []
    for _ in range(n_requests):
        kind = rng.random()
        if kind < 0.8:
            s, history = rng.choice(conversations)
            model, tokens = systems[s][0], history + words(rng.randint(32, 512))
        elif kind < 0.9:
            model, system, _, _ = rng.choice(systems)
            tokens = system + words(rng.randint(32, 512))
        else:
            model, tokens = rng.choice(list(MODELS)), words(rng.randint(128, 2048))
        requests.append((model, tokens, tuple(block_hashes(tokens, BLOCK)), rng.randint(64, 1024)))
    return Workload(replicas, cached, requests)


def make_router(policy: str, w: Workload) -> RouterCore:
    # a 100 Gb/s link, as in the recorded results
    cfg = RouterConfig(policy=policy, network_bytes_per_s=12.5e9,
                       models={m: ModelFacts(BLOCK, kv) for m, kv in MODELS.items()})
    router = RouterCore(cfg)
    now = time.time()  # stamped now: a slow build (a busy machine) must not leave them stale
    for stats in w.replicas:
        router.update_stats(dataclasses.replace(stats, updated_at=now))
    for rid, hashes in w.cached:
        router.on_blocks_stored(rid, hashes)
    return router


def calibrate(seed: int = 1) -> dict:
    """How fast this machine is right now, to compare runs across machines
    and moments: ns per iteration of a small Python loop (CPU) and per
    lookup of a random key in a 256k-entry dict (memory latency)."""
    rng = random.Random(seed)
    keys = [rng.getrandbits(64) for _ in range(1 << 18)]
    table = dict.fromkeys(keys, 0)
    probe = rng.sample(keys, 1 << 16)
    t = time.thread_time_ns()
    acc = 0
    for i in range(1 << 18):
        acc += i & 7
    loop_ns = (time.thread_time_ns() - t) / (1 << 18)
    t = time.thread_time_ns()
    for k in probe:
        table[k]
    lookup_ns = (time.thread_time_ns() - t) / len(probe)
    return {"python_loop_ns": round(loop_ns, 1), "random_dict_lookup_ns": round(lookup_ns, 1)}


def meets(decisions_per_s: float, p99_us: float) -> bool:
    return decisions_per_s >= TARGET_DECISIONS_PER_S and p99_us <= TARGET_P99_US


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e3


def run(policy: str, mode: str, w: Workload, warmup: int, gc_freeze: bool) -> dict:
    """One policy and hashing mode; latencies in both wall and thread CPU
    time (on a shared machine the latter excludes time lost to other
    processes, so it estimates a dedicated core)."""
    router = make_router(policy, w)
    gc.collect()
    if gc_freeze:
        gc.freeze()
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    route_wall: list[int] = []
    route_cpu: list[int] = []
    work_wall = work_cpu = 0
    no_capacity = 0
    for i, (model, tokens, hashes, max_tokens) in enumerate(w.requests):
        if mode == "tokens":
            req = RouteRequest(f"r{i}", model, len(tokens), max_tokens, prompt_token_ids=tokens)
        else:
            req = RouteRequest(f"r{i}", model, len(tokens), max_tokens, block_hashes=hashes)
        push = None
        if i % PUSH_EVERY == 0:
            base = w.replicas[(i // PUSH_EVERY) % len(w.replicas)]
            push = dataclasses.replace(base, updated_at=time.time())
        c0, t0 = cpu(), wall()
        router.admit(model)
        try:
            router.route(req)
        except NoCapacityError:
            no_capacity += 1
        t1, c1 = wall(), cpu()
        router.release(model)
        if push is not None:
            router.update_stats(push)
        t2, c2 = wall(), cpu()
        if i >= warmup:
            route_wall.append(t1 - t0)
            route_cpu.append(c1 - c0)
            work_wall += t2 - t0
            work_cpu += c2 - c0
    if gc_freeze:
        gc.unfreeze()
    route_wall.sort()
    route_cpu.sort()
    n = len(route_cpu)
    counters = router.counters()
    return {
        "policy": policy,
        "mode": mode,
        "requests": n,
        "decisions_per_s": n / (work_cpu / 1e9),
        "p50_us": _percentile(route_cpu, 0.50),
        "p99_us": _percentile(route_cpu, 0.99),
        "wall_decisions_per_s": n / (work_wall / 1e9),
        "wall_p50_us": _percentile(route_wall, 0.50),
        "wall_p99_us": _percentile(route_wall, 0.99),
        "wall_max_us": route_wall[-1] / 1e3,
        "no_capacity": no_capacity,
        "by_reason": counters.by_reason,
        "local_prefill": counters.local_prefill,
        "index_entries": len(router.index),
        "index_holder_sets": router.index.num_holder_sets(),
    }


def actor_path_main(args) -> None:
    import ray

    from benchmarks.router_actor_path import CONFIGS, run_all

    before = calibrate()
    n = args.requests + args.warmup
    w = build_workload(args.seed, n, args.prefixes, per_pool=args.actor_pools)
    print(f"workload: {len(w.replicas)} replicas, {args.prefixes} cached prefixes, "
          f"{n} distinct requests; {os.cpu_count()} CPUs")
    ref = [run("cost", "precomputed", w, args.warmup, gc_freeze=False)
           for _ in range(args.runs)]
    core = sorted(r["decisions_per_s"] for r in ref)
    print(f"in process (RouterCore, admit+route+release, thread CPU time): "
          f"{core[0]:,.0f} .. {core[-1]:,.0f} decisions/s")
    requests = [(model, hashes, len(tokens), max_tokens)
                for model, tokens, hashes, max_tokens in w.requests]
    router_cfg = make_router("cost", w).cfg
    router_cfg = dataclasses.replace(router_cfg, max_queue_per_model=100_000)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    try:
        configs = [c for c in CONFIGS if args.configs is None or c.label in args.configs]
        results = run_all(router_cfg, w.replicas, w.cached, requests, args.callers, args.runs,
                          args.warmup_s, args.measure_s, configs)
    finally:
        ray.shutdown()
    print(f"\n{'configuration':46s} {'placements/s (range)':>24s} {'p50 ms':>14s} {'p99 ms':>14s}"
          f" {'per router CPU-s':>20s}")
    by_cfg: dict[str, list[dict]] = {}
    for r in results:
        by_cfg.setdefault(r["config"], []).append(r)
    for label, rs in by_cfg.items():
        rate = sorted(r["placements_per_s"] for r in rs)
        p50 = sorted(r["p50_ms"] for r in rs)
        p99 = sorted(r["p99_ms"] for r in rs)
        per = sorted(r["per_router_cpu_s"] for r in rs)
        print(f"{label:46s} {rate[0]:11,.0f} .. {rate[-1]:9,.0f} {p50[0]:6.2f} .. {p50[-1]:5.2f}"
              f" {p99[0]:6.2f} .. {p99[-1]:5.2f} {per[0]:9,.0f} .. {per[-1]:7,.0f}")
    if args.out:
        write_json(args.out, {
            "benchmark": "router_actor_path", "replicas": len(w.replicas),
            "cached_prefixes": args.prefixes, "callers_per_ingress": args.callers,
            "measure_s": args.measure_s, "runs": args.runs, "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "calibration_before": before, "calibration_after": calibrate(),
            "in_process_decisions_per_s": [r["decisions_per_s"] for r in ref],
            "results": results})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10000, help="timed requests per policy and mode")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--prefixes", type=int, default=10000, help="cached conversations in the index")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after setup")
    ap.add_argument("--out", help="write the JSON record here")
    ap.add_argument("--actor-path", action="store_true",
                    help="placements/s through router actors (see the module docstring)")
    ap.add_argument("--runs", type=int, default=3, help="--actor-path: runs of every configuration")
    ap.add_argument("--callers", type=int, default=32, help="--actor-path: callers per ingress")
    ap.add_argument("--actor-pools", type=int, default=8,
                    help="--actor-path: replicas per pool (2 models x prefill + decode)")
    ap.add_argument("--configs", nargs="+", help="--actor-path: only these configurations "
                    "(labels as printed)")
    ap.add_argument("--warmup-s", type=float, default=1.0)
    ap.add_argument("--measure-s", type=float, default=4.0)
    args = ap.parse_args()
    if args.actor_path:
        return actor_path_main(args)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    before = calibrate()
    print(f"machine now: {before['python_loop_ns']} ns per Python loop step, "
          f"{before['random_dict_lookup_ns']} ns per random lookup in a 256k dict")
    t = time.perf_counter()
    w = build_workload(args.seed, args.requests + args.warmup, args.prefixes)
    prompt_lens = sorted(len(r[1]) for r in w.requests)
    print(f"workload: {len(w.replicas)} replicas, {args.prefixes} cached prefixes, "
          f"{len(w.requests)} requests (prompt p50 {prompt_lens[len(prompt_lens) // 2]} tokens), "
          f"built in {time.perf_counter() - t:.1f} s")
    results = []
    header = (f"{'policy':13s} {'hashes':12s} {'decisions/s':>11s} {'p50 us':>7s} {'p99 us':>7s}"
              f" | {'wall dec/s':>10s} {'p50 us':>7s} {'p99 us':>7s} | target >=20,000/s, p99 <=1000 us")
    print(header)
    print("-" * len(header))
    for policy in args.policies:
        for mode in args.modes:
            r = run(policy, mode, w, args.warmup, args.gc_freeze)
            r["meets_target"] = meets(r["decisions_per_s"], r["p99_us"])
            r["meets_target_wall"] = meets(r["wall_decisions_per_s"], r["wall_p99_us"])
            results.append(r)
            verdict = "cpu " + ("yes" if r["meets_target"] else "NO")
            verdict += ", wall " + ("yes" if r["meets_target_wall"] else "NO")
            print(f"{policy:13s} {mode:12s} {r['decisions_per_s']:11,.0f} {r['p50_us']:7.1f} {r['p99_us']:7.1f}"
                  f" | {r['wall_decisions_per_s']:10,.0f} {r['wall_p50_us']:7.1f} {r['wall_p99_us']:7.1f}"
                  f" | {verdict}")
    after = calibrate()
    print(f"machine after: {after['python_loop_ns']} ns per Python loop step, "
          f"{after['random_dict_lookup_ns']} ns per random lookup in a 256k dict")
    record = {
        "benchmark": "router",
        "replicas": len(w.replicas),
        "cached_prefixes": args.prefixes,
        "requests_per_run": args.requests,
        "warmup": args.warmup,
        "seed": args.seed,
        "stats_push_every": PUSH_EVERY,
        "gc_freeze": args.gc_freeze,
        "targets": {"decisions_per_s": TARGET_DECISIONS_PER_S, "p99_us": TARGET_P99_US},
        "host": platform.node(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "calibration_before": before,
        "calibration_after": after,
        "results": results,
    }
    if args.out:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
