"""Time to first token and inter-token latency over the OpenAI HTTP API served
by Ray Serve's proxy (``endpoints.http_server: proxy``) and by the ingress
replicas themselves (``ingress``), side by side on one machine: the same
cluster as benchmarks/bench_request_overhead.py (disaggregated, one prefill
and one decode replica of the embedded default model, one router, one
ingress), deployed once per mode and run, the modes alternating
(proxy, ingress, proxy, ...) so a drift in the host's load touches both.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_http_modes.py --runs 3 \\
        --out bench-results/request-overhead/http-modes.json

Each run: ``--warmup`` requests, then ``--requests`` streamed completions
one at a time (``--prompt-tokens`` in, ``--max-tokens`` out, ``ignore_eos``).
Prints each figure's range over the runs per mode and the ratio of the
medians (ingress / proxy).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from benchmarks import bench_request_overhead as overhead  # one method: its requests, figures

MODES = ("proxy", "ingress")


def config(path: str, http_port: int, grpc_port: int, mode: str):
    from splitserve.cluster.config import parse_config

    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    return parse_config({
        "models": [{"model": {"name": overhead.MODEL, "path": path, "num_blocks": 512,
                              "max_num_seqs": 16},
                    "mode": "disaggregated", "prefill": pool, "decode": pool}],
        "router": {"routers": 1, "local_prefill_max_tokens": 0},
        "auth": {"api_keys": [overhead.KEY], "cluster_token": "http-modes"},
        "endpoints": {"http_port": http_port, "grpc_port": grpc_port, "http_server": mode},
    })


def one_run(path: str, prompt: str, mode: str, args) -> dict:
    """Deploy a cluster serving HTTP in ``mode``, time its requests, shut it down."""
    import httpx

    from splitserve.cluster.bench.live import free_port
    from splitserve.cluster.serve import app

    http_port = free_port()
    app.deploy(config(path, http_port, free_port(), mode), wait_s=300)
    url = f"http://127.0.0.1:{http_port}/v1/completions"
    try:
        with httpx.Client(timeout=60) as http:
            for _ in range(args.warmup):
                overhead.one_request(http, url, prompt, args.max_tokens, None)
            reqs = [overhead.one_request(http, url, prompt, args.max_tokens, None)
                    for _ in range(args.requests)]
    finally:
        app.shutdown()
    for r in reqs:
        assert r["usage"]["completion_tokens"] == args.max_tokens, r["usage"]
    ttft = [(r["chunks_ns"][0] - r["sent_ns"]) / 1e6 for r in reqs]
    itl = [(b - a) / 1e6 for r in reqs for a, b in zip(r["chunks_ns"], r["chunks_ns"][1:])]
    e2e = [(r["chunks_ns"][-1] - r["sent_ns"]) / 1e6 for r in reqs]
    return {"mode": mode, "ttft_ms": ttft, "itl_ms": itl, "e2e_ms": e2e,
            "summary": {"ttft_p50": statistics.median(ttft),
                        "ttft_p90": overhead.pct(ttft, 0.9),
                        "itl_p50": statistics.median(itl), "itl_p90": overhead.pct(itl, 0.9),
                        "e2e_p50": statistics.median(e2e)},
            "load_average": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per mode, alternating")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs given to Ray")
    ap.add_argument("--out", default=None, help="JSON record (bench-results/...)")
    args = ap.parse_args()

    import ray

    from splitserve.cluster.bench.record import write_json
    from splitserve.cluster.serve.router_names import NAMESPACE
    from splitserve.engine.default_model import default_model_path
    from splitserve.engine.tokenizer import Tokenizer

    path = str(default_model_path())
    prompt = overhead.prompt_of(Tokenizer.from_dir(path), args.prompt_tokens)
    load_before = os.getloadavg()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.num_cpus, namespace=NAMESPACE, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": overhead.ROOT,
                                       "SPLITSERVE_BIND_HOST": "127.0.0.1"}})
    runs = []
    try:
        for k in range(args.runs):
            for mode in MODES:
                r = one_run(path, prompt, mode, args)
                s = r["summary"]
                print(f"run {k + 1} {mode:<8} TTFT p50 {s['ttft_p50']:6.1f} ms (p90 "
                      f"{s['ttft_p90']:6.1f}), ITL p50 {s['itl_p50']:5.2f} ms (p90 "
                      f"{s['itl_p90']:5.2f}), e2e p50 {s['e2e_p50']:6.1f} ms, load "
                      f"{r['load_average'][0]:.1f}", flush=True)
                runs.append({"run": k + 1, **r})
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    figures = {}
    print(f"{'figure, ms':<10} {'proxy (range)':>17} {'ingress (range)':>17} {'ingress/proxy':>14}")
    for name in ("ttft_p50", "ttft_p90", "itl_p50", "itl_p90", "e2e_p50"):
        by = {m: [r["summary"][name] for r in runs if r["mode"] == m] for m in MODES}
        ratio = statistics.median(by["ingress"]) / statistics.median(by["proxy"])
        figures[name] = {**by, "ratio_of_medians": ratio}
        print(f"{name:<10} {min(by['proxy']):7.2f}-{max(by['proxy']):7.2f}  "
              f"{min(by['ingress']):7.2f}-{max(by['ingress']):7.2f} {ratio:14.2f}")
    print(f"load average (1 min): {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    if args.out:
        write_json(os.path.abspath(args.out), {
            "command": " ".join(sys.argv), "revision": overhead.revision(overhead.ROOT),
            "figures": figures, "runs": runs, "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens, "requests": args.requests,
            "load_average": {"before": load_before, "after": load_after},
            "host": platform.node(), "cpus": os.cpu_count(), "processor": platform.processor(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
