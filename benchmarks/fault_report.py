"""Steady load through the disaggregated pools while replicas are killed:
what a fault-injection run must report (docs/benchmarks.md, "Faults under
load").

    .venv/bin/python benchmarks/fault_report.py --out bench-results/faults.json

One local Ray cluster on loopback with the embedded default model: 1
prefill and 2 decode replicas. Greedy requests arrive as a Poisson stream
(``--rate`` req/s for ``--duration`` s) through ``ClusterBackend``. A decode
replica is killed at 1/3 of the run and the prefill replica at 2/3
(``ray.kill``, no restart: Serve replaces each); the decode replica killed
is the one streaming the most requests at that moment. Every output is compared
token for token with the same prompt run on one local engine.

Reported:
  sent, completed (the reference's tokens), failed (an error reached the
  client), lost (no error but not the reference's tokens: missing, extra,
  duplicated or wrong ones; must be 0);
  TTFT and E2E p50/p99 of requests sent before the first fault, during a
  fault (from the kill until the pool has its replicas again) and after;
  per fault: seconds until the pool is whole again, and until the first
  request sent after the kill completes;
  at the end: every replica's free KV blocks back to its total, and each
  replica process's resident memory and thread count before and after.

``--no-faults`` kills nothing: run at a rate the pools cannot keep up with
for a soak (blocks back to baseline, memory and threads flat).

``--streams N`` sends N requests at once instead of the Poisson stream
(N concurrent streams), and ``--kill decode@2`` chooses what is killed
when (role@seconds, comma-separated; default: decode at 1/3 of
``--duration``, prefill at 2/3):

    .venv/bin/python benchmarks/fault_report.py --streams 64 --new-tokens 128:192 \
        --kill decode@2 --out bench-results/faults-64-streams.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from splitserve.cluster.bench.record import write_json  # noqa: E402
from splitserve.cluster.bench.report import table  # noqa: E402

MODEL = "faults"
TOKEN = "fault-report"


def cluster_config(path: str, block_size: int, max_queue_delay_s: float = 0.0):
    from splitserve.cluster.config import parse_config

    return parse_config({
        "models": [{"model": {"name": MODEL, "path": path, "block_size": block_size},
                    "prefill": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5},
                    "decode": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5}}],
        "router": {"local_prefill_max_tokens": 0, "stats_period_s": 0.1, "stats_ttl_s": 2.0,
                   "max_queue_delay_s": max_queue_delay_s},
        "auth": {"cluster_token": TOKEN},
    })


def make_requests(n: int, vocab: int, seed: int, new_tokens: tuple[int, int]):
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(16, 160))],
             rng.randint(*new_tokens)) for _ in range(n)]


def requests_and_reference(path: str, block_size: int, n: int, seed: int,
                           new_tokens: tuple[int, int]):
    """``n`` (prompt, max_tokens) and each one's greedy output on one local engine."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=path, model_id=MODEL, block_size=block_size))
    reqs = make_requests(n, eng.model_cfg.vocab_size, seed, new_tokens)
    params = [SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True) for _, k in reqs]
    return reqs, [r.token_ids for r in eng.generate([p for p, _ in reqs], params)]


def start_cluster(cfg, num_cpus: int) -> None:
    """A local Ray node on loopback with ``cfg``'s pools deployed (no ingress)."""
    import ray

    from splitserve.cluster.serve import app
    from splitserve.cluster.serve.router_names import NAMESPACE

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    app.deploy(cfg, with_ingress=False, wait_s=300)


def pool_ids() -> tuple[list[str], list[str]]:
    import ray

    from splitserve.cluster.serve import app

    reps = ray.get(app.get_router().replicas.remote()).get(MODEL, {"prefill": [], "decode": []})
    return [r["replica_id"] for r in reps["prefill"]], [r["replica_id"] for r in reps["decode"]]


def replica_actors(role: str) -> list[dict]:
    """Live Serve replica actors of ``role``: name and pid, from the GCS actor
    table (the public state API needs the dashboard, which this run leaves out)."""
    from ray._private import state

    return [{"name": a["Name"], "pid": a["Pid"]} for a in state.actors().values()
            if a["State"] == "ALIVE" and f"{MODEL}-{role}" in (a.get("Name") or "")]


def process_usage() -> dict[str, dict]:
    """Resident memory (MiB) and threads of each live replica process."""
    out = {}
    for role in ("prefill", "decode"):
        for a in replica_actors(role):
            try:
                with open(f"/proc/{a['pid']}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                out[a["name"]] = {"role": role, "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
                                  "threads": int(fields["Threads"])}
            except (OSError, KeyError):
                pass
    return out


def _pid_listening_on(port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` has a socket listening on ``port`` (from /proc)."""
    inodes = set()
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table_path) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(cols[9])
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return pid
    return None


def kill_one(role: str, address: str | None = None) -> str:
    """Kill the replica of ``role`` serving ``address`` (host:port of its worker
    RPC server), or the first one."""
    import ray

    actors = replica_actors(role)
    victim = actors[0]
    if address:
        pid = _pid_listening_on(int(address.rsplit(":", 1)[1]), [a["pid"] for a in actors])
        victim = next((a for a in actors if a["pid"] == pid), victim)
    ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
    return victim["name"]


async def pools_free(cfg) -> dict[str, bool]:
    from splitserve.engine.stats import stats_from_wire
    from splitserve.handoff.rpc import WorkerClient

    prefill, decode = pool_ids()
    out = {}
    for a in prefill + decode:
        c = WorkerClient(a, cfg.cluster_token())
        try:
            s = await c.call("Stats", {}, timeout=10)
            out[a] = stats_from_wire(s).idle()
        except Exception:  # noqa: BLE001 - a replica still starting counts as not free
            out[a] = False
        finally:
            await c.close()
    return out


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(cfg, reqs, want, rate: float, duration: float, seed: int,
              kills: list[tuple[str, float]], streams: int = 0):
    """``kills``: (role, seconds) to kill; ``streams``: N requests sent at
    once instead of the Poisson stream."""
    from splitserve.cluster.serve.orchestrator import ClusterBackend
    from splitserve.engine.sampling_params import SamplingParams

    be = ClusterBackend(cfg)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0  # noqa: E731
    records: list[dict] = []
    faults: list[dict] = []

    async def one(i: int, at: float) -> None:
        await asyncio.sleep(max(at - clock(), 0.0))
        prompt, n = reqs[i]
        rec = {"i": i, "sent": clock(), "tokens": [], "error": None, "first": None, "end": None,
               "decode": None}
        records.append(rec)
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        try:
            async for d in be.generate(MODEL, f"fault-{i}", list(prompt), params):
                if d["token_ids"] and rec["first"] is None:
                    rec["first"] = clock()
                rec["decode"] = d.get("placement", {}).get("decode", rec["decode"])
                rec["tokens"] += d["token_ids"]
        except Exception as e:  # noqa: BLE001 - recorded per request
            rec["error"] = f"{type(e).__name__}: {e}"[:200]
        rec["end"] = clock()

    async def inject(at: float, role: str, size: int) -> None:
        await asyncio.sleep(max(at - clock(), 0.0))
        # the decode replica streaming the most requests right now: mid-stream deaths
        streaming: dict[str, int] = {}
        for r in records:
            if r["first"] is not None and r["end"] is None and r["decode"]:
                streaming[r["decode"]] = streaming.get(r["decode"], 0) + 1
        target = max(streaming, key=streaming.get) if role == "decode" and streaming else None
        name = await asyncio.to_thread(kill_one, role, target)
        fault = {"role": role, "replica": name, "at": clock(), "whole_at": None,
                 "streams_on_it": streaming.get(target, 0) if target else None}
        faults.append(fault)
        killed = set(pool_ids()[0 if role == "prefill" else 1])
        while clock() < at + 180:
            await asyncio.sleep(0.5)
            ids = set(pool_ids()[0 if role == "prefill" else 1])
            # whole again: the pool has its size, with a replica that is new since the kill
            if len(ids) == size and ids != killed and len(replica_actors(role)) == size:
                fault["whole_at"] = clock()
                break

    samples: list[dict] = []

    async def sample_usage(every_s: float = 20.0) -> None:
        while True:
            usage = await asyncio.to_thread(process_usage)
            samples.append({"t": clock(), "rss_mib": {k: v["rss_mib"] for k, v in usage.items()},
                            "threads": {k: v["threads"] for k, v in usage.items()}})
            await asyncio.sleep(every_s)

    times, t = [], 0.0
    while not streams:
        t += rng.expovariate(rate)
        if t >= duration or len(times) == len(reqs):
            break
        times.append(t)
    times = times or [0.0] * streams
    sampler = asyncio.ensure_future(sample_usage())
    sizes = {"decode": 2, "prefill": 1}
    try:
        await asyncio.gather(*(one(i, at) for i, at in enumerate(times)),
                             *(inject(at, role, sizes[role]) for role, at in kills))
    finally:
        sampler.cancel()
        counters = dict(be.counters)
        await be.close()
    return records, faults, counters, samples


def summarize(records, faults, want) -> dict:
    done, failed, lost = 0, 0, 0
    for r in records:
        if r["error"] is not None:
            failed += 1
        elif r["tokens"] == want[r["i"]]:
            done += 1
        else:
            lost += 1
            r["mismatch"] = True
    windows = [(f["at"], f["whole_at"] if f["whole_at"] is not None else float("inf")) for f in faults]

    def phase(r) -> str:
        if not windows or r["sent"] < windows[0][0]:
            return "before"
        if any(a <= r["sent"] < b for a, b in windows):
            return "during"
        return "after"

    lat = {}
    for name in ("before", "during", "after"):
        ok = [r for r in records if r["error"] is None and r["first"] is not None and phase(r) == name]
        lat[name] = {"requests": len(ok),
                     "ttft_p50_s": percentile([r["first"] - r["sent"] for r in ok], 0.5),
                     "ttft_p99_s": percentile([r["first"] - r["sent"] for r in ok], 0.99),
                     "e2e_p50_s": percentile([r["end"] - r["sent"] for r in ok], 0.5),
                     "e2e_p99_s": percentile([r["end"] - r["sent"] for r in ok], 0.99)}
    for f in faults:
        after = [r for r in records if r["sent"] >= f["at"] and r["error"] is None and r["end"]]
        f["first_success_s"] = min((r["end"] for r in after), default=None)
        if f["first_success_s"] is not None:
            f["first_success_s"] -= f["at"]
        f["whole_after_s"] = None if f["whole_at"] is None else f["whole_at"] - f["at"]
    return {"sent": len(records), "completed": done, "failed": failed, "lost": lost,
            "errors": sorted({r["error"] for r in records if r["error"]}),
            "failed_by": dict(Counter(r["error"].split(":")[0] for r in records if r["error"])),
            "latency": lat,
            "faults": faults}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=4.0, help="offered requests per second")
    ap.add_argument("--duration", type=float, default=45.0, help="seconds of load")
    ap.add_argument("--block-size", type=int, default=16)
    # long enough outputs that a killed decode replica is streaming some of them
    ap.add_argument("--new-tokens", default="64:192", help="output lengths, uniform lo:hi")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs given to Ray")
    ap.add_argument("--no-faults", action="store_true",
                    help="kill nothing: a soak (run it at a rate that saturates the pools)")
    ap.add_argument("--streams", type=int, default=0,
                    help="send this many requests at once instead of the Poisson stream")
    ap.add_argument("--kill", default=None,
                    help="role@seconds[,...] to kill (default: decode at 1/3 of --duration, "
                         "prefill at 2/3)")
    ap.add_argument("--max-queue-delay", type=float, default=0.0,
                    help="router.max_queue_delay_s (0: requests wait for a replica without "
                         "bound; the operator default is 30): shed new requests past saturation")
    ap.add_argument("--out", default=None, help="JSON record path")
    args = ap.parse_args()

    import ray

    from splitserve.cluster.serve import app
    from splitserve.engine.default_model import default_model_path

    path = str(default_model_path())
    lo, hi = (int(v) for v in args.new_tokens.split(":"))
    # enough for the Poisson stream: its count exceeds 1.2 x the mean with negligible odds here
    n = args.streams or int(args.rate * args.duration * 1.2) + 20
    reqs, want = requests_and_reference(path, args.block_size, n, args.seed, (lo, hi))
    if args.no_faults:
        kills = []
    elif args.kill:
        kills = [(role, float(at)) for role, at in (k.split("@") for k in args.kill.split(","))]
    else:
        kills = [("decode", args.duration / 3), ("prefill", 2 * args.duration / 3)]
    cfg = cluster_config(path, args.block_size, args.max_queue_delay)
    try:
        start_cluster(cfg, args.num_cpus)
        usage_before = process_usage()
        records, faults, counters, samples = asyncio.run(
            run(cfg, reqs, want, args.rate, args.duration, args.seed, kills, args.streams))
        free = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # leases of killed hand-offs may still run out
            free = asyncio.run(pools_free(cfg))
            if free and all(free.values()):
                break
            time.sleep(1)
        usage_after = process_usage()
        app.shutdown()
    finally:
        ray.shutdown()

    s = summarize(records, faults, want)
    s.update(client_counters=counters, usage_samples=samples, blocks_free_at_end=free, usage_before=usage_before, usage_after=usage_after,
             rate=args.rate, duration_s=args.duration, streams=args.streams, kills=kills,
             max_queue_delay_s=args.max_queue_delay, new_tokens=args.new_tokens,
             host=platform.node(), cpus=os.cpu_count())
    print(f"sent {s['sent']}  completed {s['completed']}  failed {s['failed']}  "
          f"lost {s['lost']} (must be 0)")
    for e in s["errors"]:
        print(f"  error: {e}")
    print(f"client: placed again before the first token {counters.get('retries', 0)}, resumed "
          f"on another replica mid-stream {counters.get('resumed', 0)}, refused "
          f"{counters.get('refused', 0)}")
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    print(table([[k, v["requests"], ms(v["ttft_p50_s"]), ms(v["ttft_p99_s"]), ms(v["e2e_p50_s"]),
                  ms(v["e2e_p99_s"])] for k, v in s["latency"].items()],
                ["sent", "ok", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms", "E2E p99 ms"]))
    print(table([[f["role"], f"{f['at']:.1f}", "-" if f["streams_on_it"] is None else
                  f["streams_on_it"], "-" if f["whole_after_s"] is None else
                  f"{f['whole_after_s']:.1f}", "-" if f["first_success_s"] is None else
                  f"{f['first_success_s']:.2f}"] for f in s["faults"]],
                ["killed", "at s", "streaming on it", "pool whole after s",
                 "first success after s"]))
    print(f"KV blocks free, no request state left at the end: {bool(free) and all(free.values())} ({len(free)} replicas)")
    for name, u in sorted(usage_after.items()):
        b = usage_before.get(name)
        was = f"{b['rss_mib']:.0f} MiB, {b['threads']} threads" if b else "new replica"
        print(f"  {u['role']:7s} {name[-12:]}: {u['rss_mib']:.0f} MiB, {u['threads']} threads "
              f"(before: {was})")
    names = sorted({n for smp in samples for n in smp["rss_mib"]})
    if samples:
        print("resident MiB / threads over the run, per replica:")
        print(table([[f"{smp['t']:.0f}"] + [
            f"{smp['rss_mib'][n]:.0f} / {smp['threads'][n]}" if n in smp["rss_mib"] else "-"
            for n in names] for smp in samples], ["t s"] + [n[-8:] for n in names]))
    if args.out:
        write_json(args.out, s, default=str)
        print(f"wrote {args.out}")
    return 0 if s["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
