"""A bench run replayed in the simulator: exactly the requests a ``splitserve
bench`` record says it sent (send times, prompt and output lengths), on a
config's pools and the profiles of a database, through the production
decision code. What the validation benchmarks put beside the measured run.

Consecutive runs of one record (a load step: ``--rates 1,8
--num-requests 10,80``) replay as one workload on one clock, each run
placed at its wall-clock start (``started_at``), so the simulated
autoscaler sees the step when the real one did."""

from __future__ import annotations

from pathlib import Path

from splitserve.cluster.config import load_config
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.sim.cli_args import shapes_for
from splitserve.cluster.planning.sim.simulator import SimOptions, SimResult, Simulation
from splitserve.cluster.planning.workload import TraceRequest


def bench_t0(runs: list[dict]) -> float:
    """Wall-clock seconds of the first request the runs sent: simulated t = 0."""
    return min(run.get("started_at", 0.0) + r["send_time"] for run in runs
               for r in run["requests"])


def bench_workload(runs: list[dict]) -> list[TraceRequest]:
    """The requests of ``runs`` (records' ``runs[i]``) on one clock, t = 0 at
    the first send; several runs need their ``started_at``."""
    if len(runs) > 1 and any("started_at" not in run for run in runs):
        raise ValueError("runs recorded without started_at cannot be put on one clock; "
                         "bench again with this version")
    t0 = bench_t0(runs)
    reqs = sorted((run.get("started_at", 0.0) + r["send_time"] - t0, r["prompt_len"],
                   r["output_len"]) for run in runs for r in run["requests"])
    return [TraceRequest(t, n_in, n_out) for t, n_in, n_out in reqs]


def replay_bench_runs(cfg_path: str | Path, runs: list[dict], db: ProfileDB,
                      opts: SimOptions = SimOptions(), hardware: str = "local") -> SimResult:
    """The simulation of ``runs`` played back to back on ``cfg_path``'s
    pools, every pool on ``hardware``: its record and pools (timelines,
    autoscaling decisions)."""
    cfg = load_config(cfg_path)
    return Simulation(cfg, shapes_for(cfg, []), lambda model, role: hardware, db,
                      bench_workload(runs), opts).run()


def replay_bench_run(cfg_path: str | Path, bench_run: dict, db: ProfileDB, seed: int,
                     hardware: str = "local", serving_overhead: bool = True) -> dict:
    """The simulated summary (TTFT/TPOT percentiles, goodput, ...) of one run
    of a bench record (``record["runs"][i]``), every pool on ``hardware``;
    ``serving_overhead``: with the serving path's measured cost, where the
    database has it (``SimOptions.serving_overhead``)."""
    opts = SimOptions(seed=seed, serving_overhead=serving_overhead)
    return replay_bench_runs(cfg_path, [bench_run], db, opts, hardware).record["summary"]
