"""A bench run replayed in the simulator: exactly the requests a ``splitserve
bench`` record says it sent (send times, prompt and output lengths), on a
config's pools and the profiles of a database, through the production
decision code. What the validation benchmarks put beside the measured run."""

from __future__ import annotations

from pathlib import Path

from splitserve.cluster.config import load_config
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.sim.cli_args import shapes_for
from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation
from splitserve.cluster.planning.workload import TraceRequest


def replay_bench_run(cfg_path: str | Path, bench_run: dict, db: ProfileDB, seed: int,
                     hardware: str = "local") -> dict:
    """The simulated summary (TTFT/TPOT percentiles, goodput, ...) of one run
    of a bench record (``record["runs"][i]``), every pool on ``hardware``."""
    cfg = load_config(cfg_path)
    reqs = sorted(bench_run["requests"], key=lambda r: r["send_time"])
    t0 = reqs[0]["send_time"]
    workload = [TraceRequest(r["send_time"] - t0, r["prompt_len"], r["output_len"]) for r in reqs]
    sim = Simulation(cfg, shapes_for(cfg, []), lambda model, role: hardware, db, workload,
                     SimOptions(seed=seed))
    return sim.run().record["summary"]
