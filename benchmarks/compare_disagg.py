"""Disaggregated (1 prefill + 1 decode replica) versus colocated (2 replicas
that both prefill and decode) on the same model, resources and workload.

    .venv/bin/python benchmarks/compare_disagg.py --out bench-results/disagg.json \\
        --plot bench-results/disagg.png

One local Ray cluster on loopback; each layout is deployed in turn (one CPU
per replica), warmed up, then loaded through ``ClusterBackend`` with the
same requests at each rate (Poisson arrivals; ``--via http`` goes through
the OpenAI HTTP ingress instead). Printed side by side: the
serving statistics, the goodput ratio (disaggregated / colocated) per rate,
the mean phase breakdown (queue, prefill, hand-off, decode) and the TTFT
breakdown (queue, prefill, transfer, first token); see
``cluster/bench/phases.py`` for what each phase covers.

SLOs are scaled to this model and machine: ``--slo-scale`` (default 5) times
the unloaded TTFT of a mean-length prompt and the unloaded TPOT, both
measured first in this run on one engine in this process with one thread
(as a replica runs), fastest of 5. ``--ttft-slo`` / ``--tpot-slo`` set them directly.
The disaggregated router never prefills on the decode replica
(``local_prefill_max_tokens: 0``), so the two layouts stay distinct.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from splitserve.cluster.bench import report  # noqa: E402
from splitserve.cluster.bench.arrivals import ArrivalSpec  # noqa: E402
from splitserve.cluster.bench.datasets import parse_length_dist, synthetic_requests  # noqa: E402
from splitserve.cluster.bench.phases import PHASES, TTFT_PARTS  # noqa: E402
from splitserve.cluster.bench.record import write_json  # noqa: E402
from splitserve.cluster.bench.report import table  # noqa: E402
from splitserve.cluster.bench.runner import BackendTarget, HttpTarget  # noqa: E402
from splitserve.cluster.bench.sweep import parse_rates, run_sweep  # noqa: E402

MODEL = "bench"
MODES = ("disaggregated", "colocated")
SHORT = {"disaggregated": "disagg", "colocated": "coloc"}
REPLICAS = 2  # per layout: 1 prefill + 1 decode, or 2 colocated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_config(mode: str, path: str | None, block_size: int):
    from splitserve.cluster.config import parse_config

    one = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1}
    served = {"model": {"name": MODEL, "path": path, "block_size": block_size}, "mode": mode}
    if mode == "disaggregated":
        served.update(prefill=one, decode=one)
    else:
        served["decode"] = {**one, "min_replicas": REPLICAS, "max_replicas": REPLICAS}
    return parse_config({"models": [served],
                         "router": {"stats_period_s": 0.1, "local_prefill_max_tokens": 0},
                         "auth": {"cluster_token": "compare-disagg"},
                         "endpoints": {"http_port": free_port(), "grpc_port": free_port()}})


def unloaded_latency(path: str, prompt_len: int, block_size: int, repeats: int = 5):
    """(TTFT, TPOT) of one request at a time on one engine with one thread: the
    fastest of ``repeats`` runs, the least disturbed by other processes."""
    import torch

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eng = LLMEngine(EngineConfig(model=path, model_id=MODEL, block_size=block_size))
        ttfts, tpots = [], []
        for i in range(repeats + 1):  # the first run warms up
            ids = [10 + (31 * i + 7 * j) % 490 for j in range(prompt_len)]  # distinct: no cache hits
            t0 = time.perf_counter()
            eng.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
            ttft = time.perf_counter() - t0
            ids = [10 + (37 * i + 11 * j) % 490 for j in range(prompt_len)]
            t0 = time.perf_counter()
            eng.generate([ids], SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True))
            if i:
                ttfts.append(ttft)
                tpots.append(max(time.perf_counter() - t0 - ttft, 0.0) / 32)
        return min(ttfts), min(tpots)
    finally:
        torch.set_num_threads(threads)


async def load(cfg, args, ttft_slo: float, tpot_slo: float):
    from splitserve.cluster.serve.orchestrator import ClusterBackend

    if args.via == "http":
        be, target = None, HttpTarget(f"http://127.0.0.1:{cfg.endpoints.http_port}", MODEL)
    else:
        be = ClusterBackend(cfg)
        target = BackendTarget(be, MODEL)
    inp, out = parse_length_dist(args.input_len), parse_length_dist(args.output_len)
    try:
        warm = synthetic_requests(8, inp, out, seed=10_000)
        await run_sweep(target, lambda i: warm, [math.inf], ArrivalSpec(), ttft_slo, tpot_slo,
                        announce=False)
        return await run_sweep(
            target, lambda i: synthetic_requests(args.num_requests, inp, out, seed=args.seed + i),
            args.rates, ArrivalSpec(seed=args.seed), ttft_slo, tpot_slo,
            progress=not args.no_progress, request_timeout_s=120.0)
    finally:
        if be is not None:
            await be.close()


def run_mode(mode: str, args, path: str | None, ttft_slo: float, tpot_slo: float):
    from splitserve.cluster.serve import app

    cfg = cluster_config(mode, path, args.block_size)
    t0 = time.perf_counter()
    app.deploy(cfg, with_ingress=args.via == "http", wait_s=300)
    print(f"{mode}: deployed in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    try:
        return asyncio.run(load(cfg, args, ttft_slo, tpot_slo))
    finally:
        app.shutdown()


def phase_table(series, keys: tuple[str, ...], attr: str) -> str:
    rows = []
    for mode, points in series.items():
        for p in points:
            vals = getattr(p.stats, attr)
            rows.append([mode, f"{p.rate:g}"] + [f"{vals[k] * 1000:.1f}" for k in keys]
                        + [f"{sum(vals[k] for k in keys) * 1000:.1f}"])
    total = "E2E" if attr == "phases" else "TTFT"
    return table(rows, ["layout", "req/s"] + [f"{k} ms" for k in keys] + [f"{total} ms"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None, help="checkpoint folder (default: the embedded "
                    "default model)")
    ap.add_argument("--rates", default="2,4,8", help="offered request rates, req/s")
    ap.add_argument("--num-requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--input-len", default="uniform:128:512", help="prompt length distribution")
    ap.add_argument("--output-len", default="32", help="output length distribution")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--slo-scale", type=float, default=5.0,
                    help="SLOs = this times the unloaded TTFT / TPOT measured first")
    ap.add_argument("--ttft-slo", type=float, default=None, help="seconds (overrides the scaling)")
    ap.add_argument("--tpot-slo", type=float, default=None, help="seconds (overrides the scaling)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=REPLICAS, help="CPUs given to Ray")
    ap.add_argument("--out", default=None, help="JSON record path")
    ap.add_argument("--plot", default=None, help="PNG path")
    ap.add_argument("--via", choices=("backend", "http"), default="backend",
                    help="backend: ClusterBackend in this process (no ingress hop); http: the "
                    "OpenAI HTTP ingress deployed with the pools")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    args.rates = parse_rates(args.rates)

    import ray

    from splitserve.cluster.serve.router_names import NAMESPACE
    from splitserve.engine.default_model import default_model_path

    path = args.model_path or str(default_model_path())
    mean_in = round(statistics.mean(
        parse_length_dist(args.input_len).sample(1000, np.random.default_rng(0))))
    ttft0, tpot0 = unloaded_latency(path, mean_in, args.block_size)
    ttft_slo = args.ttft_slo or args.slo_scale * ttft0
    tpot_slo = args.tpot_slo or args.slo_scale * tpot0
    slo_note = (f"SLOs: TTFT <= {ttft_slo * 1000:.0f} ms, TPOT <= {tpot_slo * 1000:.1f} ms "
                f"({args.slo_scale:g} x unloaded TTFT {ttft0 * 1000:.1f} ms of a {mean_in}-token "
                f"prompt and TPOT {tpot0 * 1000:.2f} ms, one engine thread, this run)"
                if args.ttft_slo is None and args.tpot_slo is None else
                f"SLOs: TTFT <= {ttft_slo * 1000:.0f} ms, TPOT <= {tpot_slo * 1000:.1f} ms (given)")
    print(slo_note, file=sys.stderr)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.num_cpus, namespace=NAMESPACE, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        series = {mode: run_mode(mode, args, args.model_path, ttft_slo, tpot_slo) for mode in MODES}
    finally:
        ray.shutdown()

    via = "the HTTP ingress" if args.via == "http" else "ClusterBackend in this process"
    print(f"\nworkload: {args.num_requests} requests per rate, Poisson arrivals, prompts "
          f"{args.input_len} tokens, outputs {args.output_len} tokens, through {via}; "
          f"{REPLICAS} replicas x 1 CPU per layout\n{slo_note}\n")
    print(report.format_table({f"{SHORT[m]} {rate:g}/s": series[m][i].stats
                               for i, rate in enumerate(args.rates) for m in MODES}))
    rows = []
    for d, c in zip(series["disaggregated"], series["colocated"]):
        ratio = d.stats.goodput / c.stats.goodput if c.stats.goodput else math.inf
        rows.append([f"{d.rate:g}", f"{d.stats.goodput:.2f}", f"{c.stats.goodput:.2f}",
                     f"{d.stats.goodput / REPLICAS:.2f}", f"{c.stats.goodput / REPLICAS:.2f}",
                     f"{ratio:.2f}"])
    print("\ngoodput (req/s meeting both SLOs)")
    print(table(rows, ["req/s", "disagg", "coloc", "disagg/replica", "coloc/replica",
                       "ratio disagg/coloc"]))
    print("\nphase breakdown (mean per request; sums to E2E)")
    print(phase_table(series, PHASES, "phases"))
    print("\nTTFT breakdown (mean per request; sums to TTFT)")
    print(phase_table(series, TTFT_PARTS, "ttft_parts"))
    config = {k: v for k, v in vars(args).items()} | {
        "ttft_slo_s": ttft_slo, "tpot_slo_s": tpot_slo, "unloaded_ttft_s": ttft0,
        "unloaded_tpot_s": tpot0, "mean_prompt_len": mean_in, "replicas_per_layout": REPLICAS}
    if args.out:
        write_json(args.out, report.record(series, config))
        print(f"\nwrote {args.out}")
    if args.plot:
        report.plot(series, args.plot, title=f"disaggregated vs colocated, {REPLICAS} replicas each")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
