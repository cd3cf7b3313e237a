"""The serving path's overhead in the profile database and the simulator:
the best row per (model, device, layout), folded into decode steps (a
linear term, so coalesced decode runs stay exact) and into each request's
arrival, and switched off on demand."""

import json

import pytest

from splitserve.cluster.planning import profiles
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.records import DERIVED, EngineSettings
from splitserve.cluster.planning.shapes import PRESETS
from splitserve.cluster.planning.step_model import StepTimeModel
from tests.unit.test_planning_replay import run
from splitserve.cluster.planning.sim.replay import replay_bench_runs
from splitserve.cluster.planning.sim.simulator import SimOptions

LLAMA8B = PRESETS["llama-3.1-8b"]


def test_with_serving_adds_per_step_and_per_sequence_terms_to_every_form():
    m = StepTimeModel(((0.001, 1e-5, 0.0, 2e-4, 1e-7), (0.002, 0.0, 0.0, 1e-4, 3e-7)),
                      overhead_s=0.0005, source="x")
    s = m.with_serving(0.003, 0.0004, "probe")
    for b, ctx in ((1, 100), (8, 4000), (32, 20000)):
        assert s.step_s(0, 0, b, ctx) == pytest.approx(m.step_s(0, 0, b, ctx) + 0.003 + 0.0004 * b)
    # a decode run's closed form agrees with summing the steps
    total = sum(s.step_s(0, 0, 8, 4000 + 8 * k) for k in range(50))
    assert s.decode_run_s(8, 4000, 50) == pytest.approx(total)
    assert "serving 3.00 ms/step + 0.40 ms/sequence (probe)" in s.source
    assert m.with_serving(0.0, 0.0, "none") is m


def test_best_serving_row_per_layout_and_its_profile(tmp_path):
    db = ProfileDB(tmp_path / "p.db")
    assert db.serving(LLAMA8B.key, "h100-sxm", "disaggregated") is None
    db.add_serving(LLAMA8B, "h100-sxm", "disaggregated", 0.001, 0.0001, 0.01, 8, DERIVED)
    db.add_serving(LLAMA8B, "h100-sxm", "disaggregated", 0.002, 0.0002, 0.02, 40)
    db.add_serving(LLAMA8B, "h100-sxm", "colocated", 0.005, 0.0, 0.03, 40)
    row = db.serving(LLAMA8B.key, "h100-sxm", "disaggregated")
    assert (row["per_step_s"], row["per_request_s"], row["provenance"]) == (0.002, 0.02, "measured")
    s = EngineSettings(dtype="bfloat16")
    plain = profiles.device_profile(db, LLAMA8B, "h100-sxm", s)
    served = profiles.device_profile(db, LLAMA8B, "h100-sxm", s, "colocated")
    assert plain.request_s == 0.0 and plain.serving is None
    assert served.request_s == 0.03 and served.serving["per_step_s"] == 0.005
    assert served.step.step_s(0, 0, 4, 400) == pytest.approx(plain.step.step_s(0, 0, 4, 400)
                                                             + 0.005)


def test_the_simulator_adds_it_to_decode_steps_and_requests_only_when_asked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("""
name: t
models:
  - model: {name: default, path: null, max_num_seqs: 8, num_blocks: 512}
    prefill: {num_gpus: 1, autoscaling: null}
    decode: {num_gpus: 1, autoscaling: null}
""")
    db = ProfileDB(tmp_path / "p.db")
    runs = [run(0.0, [i * 0.5 for i in range(6)], prompt=64, output=20)]

    def tpot_ttft(**kw):
        s = replay_bench_runs(cfg, runs, db, SimOptions(**kw), "h100-sxm").record["summary"]
        return s["tpot"]["p50"], s["ttft"]["p50"]

    base = tpot_ttft()
    from splitserve.cluster.config import load_config
    from splitserve.cluster.planning.sim.cli_args import shapes_for

    shape = shapes_for(load_config(cfg), [])["default"]
    db.add_serving(shape, "h100-sxm", "disaggregated", 0.004, 0.001, 0.05, 16)
    tpot, ttft = tpot_ttft()
    # one sequence decodes at a time: each step pays 4 + 1 ms
    assert tpot == pytest.approx(base[0] + 0.005, rel=0.02)
    # the first token comes from the prefill replica: the request's 50 ms, at
    # most one decode step more where it waits for the step in flight
    assert base[1] + 0.05 <= ttft <= base[1] + 0.05 + 0.005
    assert tpot_ttft(serving_overhead=False) == base
    # a colocated config does not take the disaggregated row
    data = cfg.read_text().replace("name: t", "name: t2") + "    mode: colocated\n"
    cfg.write_text(data)
    assert json.dumps(tpot_ttft()) == json.dumps(tpot_ttft(serving_overhead=False))
