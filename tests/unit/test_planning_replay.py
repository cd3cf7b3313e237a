"""Bench records replayed in the simulator: consecutive runs (a load step)
on one clock, and the replay through the production decision code."""

import pytest

from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.sim.replay import bench_t0, bench_workload, replay_bench_runs
from splitserve.cluster.planning.sim.simulator import SimOptions


def run(started_at, sends, prompt=64, output=8):
    return {"started_at": started_at,
            "requests": [{"send_time": t, "prompt_len": prompt, "output_len": output}
                         for t in sends]}


def test_runs_share_one_clock_from_the_first_send():
    runs = [run(1000.0, [0.5, 2.0]), run(1004.0, [0.25, 0.0], prompt=32)]
    assert bench_t0(runs) == 1000.5
    wl = bench_workload(runs)
    assert [(r.arrival_s, r.input_len) for r in wl] == [(0.0, 64), (1.5, 64), (3.5, 32),
                                                         (3.75, 32)]
    # one run of an older record (no started_at) still replays
    old = {"requests": run(0, [1.0, 3.0])["requests"]}
    assert [r.arrival_s for r in bench_workload([old])] == [0.0, 2.0]
    with pytest.raises(ValueError, match="started_at"):
        bench_workload([old, old])


def test_a_load_step_replays_and_scales_the_decode_pool(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("""
name: step
models:
  - model: {name: default, path: null, max_num_seqs: 4, num_blocks: 512}
    prefill: {min_replicas: 1, max_replicas: 1, num_gpus: 1}
    decode:
      min_replicas: 1
      max_replicas: 3
      num_gpus: 1
      autoscaling: {bottleneck: requests, target_ongoing_requests: 2, upscale_delay_s: 1,
                    cooldown_s: 1, look_back_s: 2, metrics_interval_s: 0.5}
""")
    low = run(100.0, [i * 2.0 for i in range(5)], output=32)
    high = run(110.0, [i * 0.01 for i in range(60)], output=2000)
    res = replay_bench_runs(cfg, [low, high], ProfileDB(tmp_path / "p.db"),
                            SimOptions(replica_start_s=3.0), hardware="h100-sxm")
    pool = res.pools["default-decode"]
    ups = [d for d in pool.decisions if d["to"] > d["from"]]
    # nothing to scale for before the step (10 s after the first send)
    assert ups and ups[0]["t"] > 10.0
    started = [s for s in pool.slots if s.launched_at > 0]
    assert started and all(s.ready_at - s.launched_at == pytest.approx(3.0) for s in started
                           if s.ready_at is not None)
    assert res.record["summary"]["completed"] == 65
