"""The serving path's cost beyond the engine step, measured on a running
cluster (``splitserve profile --config FILE --serving-url URL``).

``splitserve profile`` times ``LLMEngine.step()`` alone. A served request
also pays for what surrounds the step: the engine thread handing outputs to
the worker's event loop, the token stream from the decode replica through
the ingress to the HTTP client, tokenization, the router exchange, the RPC
hops, and on a shared CPU the other processes of the cluster competing
with the engine. Those costs are what made step-time estimates of local CPU
clusters several times optimistic.

Method: two closed loops against the served API (bench's runner, 64-token
prompts, 128-token outputs: long enough that the client's TPOT times the
decoding, not a burst of tokens that queued behind a late first one), at
concurrency 1 and at concurrency 4; the same
requests (send times, lengths) replayed in the simulator with the engine's
step times only; then, from the p50 residuals (real - simulated):

- TPOT at concurrency c is one decode step of about c sequences, so the
  two residuals give a line: ``per_step_s`` + ``per_seq_s`` x sequences;
- TTFT at concurrency 1 gives ``per_request_s``.

Each is clamped at 0 (a path faster than modelled adds nothing). The row
is keyed by model, device and layout (disaggregated and colocated requests
take different paths). The simulator adds it to decode and colocated steps
and to each request's arrival (``profiles.device_profile``).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from splitserve.cluster.bench.arrivals import ArrivalSpec
from splitserve.cluster.bench.datasets import parse_length_dist, synthetic_requests
from splitserve.cluster.bench.runner import HttpTarget, run_load
from splitserve.cluster.bench.stats import compute_stats
from splitserve.cluster.config import load_config
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.hardware import local_cpu_key
from splitserve.cluster.planning.sim.cli_args import shapes_for
from splitserve.cluster.planning.sim.replay import replay_bench_runs
from splitserve.cluster.planning.sim.simulator import SimOptions


@dataclass(frozen=True)
class ServingOverhead:
    layout: str
    per_step_s: float
    per_seq_s: float
    per_request_s: float
    requests: int
    # the measurements it came from: concurrency -> (real, simulated) p50 seconds
    tpot: dict[int, tuple[float, float]]
    ttft: dict[int, tuple[float, float]]


def _probe(url: str, model: str, api_key: str | None, n: int, concurrency: int,
           prompt_len: int, output_len: int, seed: int):
    reqs = synthetic_requests(n, parse_length_dist(str(prompt_len)),
                              parse_length_dist(str(output_len)), seed)
    target = HttpTarget(url, model, api_key)
    return asyncio.run(run_load(target, reqs, ArrivalSpec(math.inf, concurrency=concurrency,
                                                          seed=seed)))


def measure(cfg_path: str | Path, db: ProfileDB, url: str, api_key: str | None = None,
            prompt_len: int = 64, output_len: int = 128, requests: int = 6,
            concurrency: tuple[int, int] = (1, 4), seed: int = 1000,
            log: Callable[[str], None] = lambda s: None) -> ServingOverhead:
    """Probe the cluster serving ``cfg_path`` at ``url``, write the ``serving``
    row of its first model's layout and decode device, and return it. The
    database must hold that device's step profile (``splitserve profile``)."""
    cfg = load_config(cfg_path)
    served = cfg.models[0]
    model = served.model.name
    tpot, ttft = {}, {}
    for i, c in enumerate(concurrency):
        res = _probe(url, model, api_key, requests * c, c, prompt_len, output_len, seed + i)
        real = compute_stats(res.records, res.duration_s, 1.0, 1.0)
        if real.failed:
            raise RuntimeError(f"{real.failed} probe requests failed at concurrency {c}: "
                               f"{real.errors}")
        run = {"started_at": res.started_at,
               "requests": [{"send_time": r.send_time, "prompt_len": r.prompt_len,
                             "output_len": r.output_len} for r in res.records]}
        sim = replay_bench_runs(cfg_path, [run], db, SimOptions(seed=seed,
                                                                serving_overhead=False))
        s = sim.record["summary"]
        tpot[c] = (real.tpot.p50, s["tpot"]["p50"])
        ttft[c] = (real.ttft.p50, s["ttft"]["p50"])
        log(f"serving probe at concurrency {c}: TPOT p50 real {tpot[c][0] * 1e3:.1f} ms, "
            f"engine steps only {tpot[c][1] * 1e3:.1f} ms; TTFT p50 real "
            f"{ttft[c][0] * 1e3:.1f} ms, modelled {ttft[c][1] * 1e3:.1f} ms")
    (c1, c2) = concurrency
    r1, r2 = (tpot[c][0] - tpot[c][1] for c in concurrency)
    per_seq = max(0.0, (r2 - r1) / (c2 - c1))
    per_step = max(0.0, r1 - per_seq * c1)
    per_request = max(0.0, ttft[c1][0] - ttft[c1][1])
    shape = shapes_for(cfg, [])[model]
    key = local_cpu_key(max(1, int(served.decode.num_cpus)))
    n = requests * (c1 + c2)
    db.add_serving(shape, key, served.mode, per_step, per_seq, per_request, n)
    return ServingOverhead(served.mode, per_step, per_seq, per_request, n, tpot, ttft)
