"""Requests per second through the control plane: ingress (HTTP via Serve's
proxy, or gRPC) and router, with ``max_tokens`` 1 on the embedded default
model (~2.5M parameters), so each request is one short engine step and the
per-request costs of the path dominate.

    .venv/bin/python benchmarks/control_plane.py --runs 3 --out bench-results/control-plane.json

One local Ray node on loopback: one router, one colocated pool of
``--replicas`` replicas, and the ingress with 1 and then 2 replicas
(``endpoints.ingress_replicas``; alternated within each run, the count
changed in place). Per configuration and protocol, ``--concurrency``
clients in this process send requests back to back for ``--warmup-s`` and
then ``--measure-s`` seconds; requests/s = requests completed in the
measured window / its length. On a shared machine the rate moves with
everyone else's load, so each row also reports the CPU seconds the
ingress replicas, the router and this client spent in the window (all
threads): requests per ingress CPU-second is what one core per ingress
would sustain. gRPC clients spread over ``--channels`` connections (the
kernel hands each new one to one of the ingress replicas sharing the port).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from splitserve.cluster.bench.record import write_json  # noqa: E402
from splitserve.cluster.bench.report import table  # noqa: E402

MODEL = "cp"
KEY = "sk-control-plane"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(path: str, ingress_replicas: int, replicas: int, http_port: int, grpc_port: int):
    from splitserve.cluster.config import parse_config

    return parse_config({
        "models": [{"model": {"name": MODEL, "path": path, "max_num_seqs": 64},
                    "mode": "colocated",
                    "decode": {"min_replicas": replicas, "max_replicas": replicas,
                               "num_cpus": 0.25}}],
        "router": {"routers": 1, "stats_period_s": 0.25},
        "auth": {"api_keys": [KEY], "cluster_token": "control-plane"},
        "endpoints": {"http_port": http_port, "grpc_port": grpc_port,
                      "ingress_replicas": ingress_replicas},
    })


def pids(prefix: str) -> list[int]:
    """Process ids of the live actors whose name starts with ``prefix``."""
    import ray

    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(prefix):
            try:
                h = ray.get_actor(a["name"], namespace=a["namespace"])
                out.append(ray.get(h.__ray_call__.remote(lambda self: os.getpid()), timeout=10))
            except Exception:  # noqa: BLE001 - gone meanwhile
                pass
    return out


async def load(cfg, protocol: str, concurrency: int, channels: int, warmup_s: float,
               measure_s: float, watched: dict[str, list[int]]) -> dict:
    import grpc
    import httpx

    from splitserve.cluster.api.proto import splitserve_pb2 as pb
    from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc

    url = f"http://127.0.0.1:{cfg.endpoints.http_port}/v1/completions"
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 1, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    md = (("authorization", f"Bearer {KEY}"),)
    req = pb.GenerateRequest(model=MODEL, text="hello there",
                             params=pb.SamplingParams(max_tokens=1, temperature=0))
    start = time.monotonic()
    measure_from, measure_to = start + warmup_s, start + warmup_s + measure_s
    latencies: list[float] = []
    errors: dict[str, int] = {}
    done = 0

    async def http_client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while (t0 := time.monotonic()) < measure_to:
            try:
                r = await http.post(url, json=body, headers=headers)
                ok = r.status_code == 200
                err = None if ok else str(r.status_code)
            except httpx.HTTPError as e:
                ok, err = False, type(e).__name__
            t1 = time.monotonic()
            if measure_from <= t0 and t1 <= measure_to:
                if ok:
                    done += 1
                    latencies.append(t1 - t0)
                else:
                    errors[err] = errors.get(err, 0) + 1

    async def grpc_client(stub) -> None:
        nonlocal done
        while (t0 := time.monotonic()) < measure_to:
            try:
                async for _ in stub.Generate(req, metadata=md, timeout=60):
                    pass
                err = None
            except grpc.aio.AioRpcError as e:
                err = e.code().name
            t1 = time.monotonic()
            if measure_from <= t0 and t1 <= measure_to:
                if err is None:
                    done += 1
                    latencies.append(t1 - t0)
                else:
                    errors[err] = errors.get(err, 0) + 1

    async def cpu_at(when: float) -> dict[str, float]:
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        return {name: sum(cpu_seconds(p) for p in ps) for name, ps in watched.items()}

    before = asyncio.ensure_future(cpu_at(measure_from))
    after = asyncio.ensure_future(cpu_at(measure_to))
    if protocol == "http":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            await asyncio.gather(*(http_client(http) for _ in range(concurrency)))
    else:
        chans = [grpc.aio.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}",
                                           options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(channels)]
        stubs = [pb_grpc.GenerationStub(c) for c in chans]
        await asyncio.gather(*(grpc_client(stubs[i % channels]) for i in range(concurrency)))
        for c in chans:
            await c.close()
    b, a = await before, await after
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies \
        else None  # noqa: E731
    cpu = {k: a[k] - b[k] for k in a}
    ingress_cpu = cpu.get("ingress", 0.0)
    return {"requests_per_s": done / measure_s, "requests": done, "errors": errors,
            "p50_s": pct(0.5), "p99_s": pct(0.99), "cpu_s": cpu,
            "per_ingress_cpu_s": done / ingress_cpu if ingress_cpu > 0 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ingress-replicas", default="1,2", help="comma-separated counts to compare")
    ap.add_argument("--protocols", default="http,grpc")
    ap.add_argument("--replicas", type=int, default=2, help="colocated engine replicas")
    ap.add_argument("--concurrency", type=int, default=64, help="clients sending back to back")
    ap.add_argument("--channels", type=int, default=16, help="gRPC connections")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--measure-s", type=float, default=10.0)
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs given to Ray")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import ray

    from splitserve.cluster.serve import app
    from splitserve.cluster.serve.router_names import NAMESPACE
    from splitserve.engine.default_model import default_model_path

    path = str(default_model_path())
    counts = [int(c) for c in args.ingress_replicas.split(",")]
    protocols = args.protocols.split(",")
    http_port, grpc_port = free_port(), free_port()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.num_cpus, namespace=NAMESPACE, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "SPLITSERVE_BIND_HOST": "127.0.0.1"}})
    rows = []
    try:
        for run in range(args.runs):
            for k in counts if run % 2 == 0 else counts[::-1]:
                cfg = config(path, k, args.replicas, http_port, grpc_port)
                app.deploy(cfg, wait_s=300)
                while len(pids("SERVE_REPLICA::ingress#")) != k:  # scaled down: the extra stops
                    time.sleep(0.5)
                watched = {"ingress": pids("SERVE_REPLICA::ingress#"),
                           "router": pids("splitserve-router"), "client": [os.getpid()],
                           "engines": pids(f"SERVE_REPLICA::{MODEL}-colocated#"),
                           "proxy": pids("SERVE_PROXY_ACTOR")}
                for protocol in protocols:
                    r = asyncio.run(load(cfg, protocol, args.concurrency, args.channels,
                                         args.warmup_s, args.measure_s, watched))
                    r.update(run=run, ingress_replicas=k, protocol=protocol,
                             load_average=os.getloadavg())
                    rows.append(r)
                    print(f"run {run} ingress x{k} {protocol}: {r['requests_per_s']:.0f} req/s "
                          f"p50 {1000 * (r['p50_s'] or 0):.0f} ms p99 {1000 * (r['p99_s'] or 0):.0f}"
                          f" ms, errors {r['errors']}, CPU s {r['cpu_s']}", flush=True)
        app.shutdown()
    finally:
        ray.shutdown()

    def rng(vals, fmt):
        vals = [v for v in vals if v is not None]
        return "-" if not vals else f"{fmt(min(vals))} - {fmt(max(vals))}"

    summary = []
    for k in counts:
        for protocol in protocols:
            rs = [r for r in rows if r["ingress_replicas"] == k and r["protocol"] == protocol]
            summary.append([protocol, k, rng([r["requests_per_s"] for r in rs], lambda v: f"{v:.0f}"),
                            rng([r["p50_s"] for r in rs], lambda v: f"{1000 * v:.0f}"),
                            rng([r["p99_s"] for r in rs], lambda v: f"{1000 * v:.0f}"),
                            rng([r["per_ingress_cpu_s"] for r in rs], lambda v: f"{v:.0f}"),
                            sum(sum(r["errors"].values()) for r in rs)])
    print(table(summary, ["protocol", "ingress replicas", "requests/s", "p50 ms", "p99 ms",
                          "per ingress CPU-s", "errors"]))
    if args.out:
        write_json(args.out, {"rows": rows, "concurrency": args.concurrency,
                              "channels": args.channels, "replicas": args.replicas,
                              "measure_s": args.measure_s, "host": platform.node(),
                              "cpus": os.cpu_count(), "processor": platform.processor()},
                   default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
