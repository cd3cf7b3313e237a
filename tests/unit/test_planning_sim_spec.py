"""The simulator models speculative decoding (the engine's length rule, drawn
acceptance) and fp8 weights (fp8 rows, else the fp8 roofline)."""

import copy
import json

import pytest

from splitserve.cluster.bench.datasets import parse_length_dist
from splitserve.cluster.config import ModelSpec, parse_config
from splitserve.cluster.planning import profiles
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.planner.devices import engine_settings_for, resolve_devices
from splitserve.cluster.planning.planner.inputs import Offer
from splitserve.cluster.planning.planner.space import SpaceSpec
from splitserve.cluster.planning.records import StepSample
from splitserve.cluster.planning.shapes import PRESETS
from splitserve.cluster.planning.sim.options import SimOptions, engine_settings
from splitserve.cluster.planning.sim.simulator import Simulation
from splitserve.cluster.planning.sim.speculation import ASSUMED_ACCEPTANCE, SimSpeculator
from splitserve.cluster.planning.workload import TraceRequest, synthetic
from splitserve.engine.spec import adaptive

MODEL = "llama"
SHAPE = PRESETS["llama-3.1-8b"]
BASE = {
    "name": "spec-test",
    "models": [{
        "mode": "colocated",
        "model": {"name": MODEL, "path": "/nowhere/llama", "dtype": "bfloat16",
                  "kv_cache_memory_gb": 8, "max_num_seqs": 512, "max_num_batched_tokens": 4096},
        "decode": {"min_replicas": 1, "max_replicas": 1, "num_gpus": 1},
    }],
    "router": {"policy": "least_loaded"},
    "slo": {"ttft_s": 1.0, "tpot_s": 0.05},
}


def config(speculative=None, weight_dtype=None):
    cfg = copy.deepcopy(BASE)
    model = cfg["models"][0]["model"]
    if speculative is not None:
        model["speculative"] = speculative
    if weight_dtype is not None:
        model["weight_dtype"] = weight_dtype
    return parse_config(cfg)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return ProfileDB(tmp_path_factory.mktemp("db") / "p.db")


def run(db, cfg, workload, **opts):
    sim = Simulation(cfg, {MODEL: SHAPE}, lambda m, r: "h100-sxm", db, workload,
                     SimOptions(**opts))
    return sim, sim.run().record


def one_request(output=200):
    return [TraceRequest(arrival_s=0.0, input_len=128, output_len=output, hash_ids=())]


NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def test_ngram_speculation_at_high_acceptance_lowers_tpot_at_batch_one(db):
    _, plain = run(db, config(), one_request())
    sim, spec = run(db, config(NGRAM), one_request(), spec_acceptance_ngram=0.95)
    rec = spec["pools"][f"{MODEL}-colocated"]["speculation"]
    assert rec["acceptance_assumed"] == 0.95 and rec["mean_accepted_length"] > 4.0
    tp, ts = plain["summary"]["tpot"]["p50"], spec["summary"]["tpot"]["p50"]
    assert spec["summary"]["completed"] == 1
    # ~4.5 tokens a verify step on a memory-bound step barely longer than a plain one
    assert ts < tp / 2.5, (tp, ts)
    s = sim.pools[f"{MODEL}-colocated"].slots[0].rep.spec
    assert s.verify_steps > 0
    # each draft accepted with 0.95 while the ones before it were: E = 3.5 of 4 per step
    assert 3.0 < s.accepted_tokens / s.verified <= 4.0
    # output tokens: the prefill's first, one per verify step, the accepted drafts, and
    # a plain step for the last token when no draft fits before it
    assert s.verify_steps + s.accepted_tokens in (198, 199)


def test_low_acceptance_speculates_less(db):
    sim, _ = run(db, config(NGRAM), one_request(), spec_acceptance_ngram=0.05)
    s = sim.pools[f"{MODEL}-colocated"].slots[0].rep.spec
    # the tracker learns the low rate and the rule shortens (then stops) the drafts
    assert s.rule.tracker.alpha < 0.3
    assert s.draft_tokens < 4 * s.verify_steps


def test_the_engine_rule_switches_speculation_off_at_large_batch(db, monkeypatch):
    seen = []
    length, quiet = adaptive.LengthRule.length, adaptive.LengthRule.quiet
    calls = {"choose": 0}
    choose = adaptive.choose_num_tokens

    def spy_length(self, batch, any_candidate):
        k = length(self, batch, any_candidate)
        seen.append((batch, k))
        return k

    def spy_choose(*a, **kw):
        calls["choose"] += 1
        return choose(*a, **kw)

    quiet_at = []

    def spy_quiet(self, batch):
        q = quiet(self, batch)
        if q:
            quiet_at.append(batch)
        return q

    monkeypatch.setattr(adaptive.LengthRule, "length", spy_length)
    monkeypatch.setattr(adaptive.LengthRule, "quiet", spy_quiet)
    monkeypatch.setattr(adaptive, "choose_num_tokens", spy_choose)
    # 300 short requests at once (the router admits 256): the batch fills past
    # the point where verifying costs more than it yields near the GPU's
    # saturation (256 tokens), then drains to one sequence
    wl = [TraceRequest(arrival_s=0.0, input_len=32, output_len=40 + i % 40, hash_ids=())
          for i in range(300)]
    _, rec = run(db, config(NGRAM), wl, spec_acceptance_ngram=0.9)
    assert rec["summary"]["completed"] >= 256
    assert calls["choose"] > 0  # the engine's own decision function
    big = [k for b, k in seen if b >= 250]
    small = [k for b, k in seen if 1 <= b <= 8]
    assert small and all(k == 4 for k in small)  # a small batch speculates the full length
    assert big and all(k == 0 for k in big)  # a full one does not
    assert any(0 < k < 4 for b, k in seen)  # in between, shorter drafts
    assert all(b >= 128 for b in quiet_at)  # coalesced as plain decode only when off on cost
    # the engine decides the same at these sizes
    assert adaptive.choose_num_tokens(4, 300, 0.9, 256) == 0
    assert adaptive.choose_num_tokens(4, 1, 0.9, 256) == 4


def test_speculator_follows_disable_batch_size_and_cuts_drafts_to_the_output():
    s = SimSpeculator("ngram", 4, True, 2, None, "cuda", 0.7, 0.0, "x")

    class Seq:
        def __init__(self, sid, left):
            self.seq_id, self.num_tokens, self.num_computed_tokens = sid, 10, 9
            self.prefill_only, self.target_output, self.num_output_tokens = False, left + 1, 1

    assert s.drafts([Seq("a", 2), Seq("b", 9)]) == {"a": [0], "b": [0, 0, 0, 0]}
    assert s.drafts([Seq("a", 9), Seq("b", 9), Seq("c", 9)]) == {}  # above disable_batch_size
    assert s.quiet(3) and not s.quiet(2)


def without_timing(rec):
    rec = json.loads(json.dumps(rec, default=str))
    for k in ("wall_s", "cpu_s", "speed_x_real_time", "speed_x_real_time_cpu"):
        rec["sim"].pop(k)
    return rec


def test_speculative_simulation_is_deterministic_for_a_seed(db):
    def wl(seed):
        return synthetic(20.0, parse_length_dist("uniform:32:400"),
                         parse_length_dist("uniform:8:120"), seed=seed, num_requests=120)

    a = without_timing(run(db, config(NGRAM), wl(1), seed=1)[1])
    b = without_timing(run(db, config(NGRAM), wl(1), seed=1)[1])
    c = without_timing(run(db, config(NGRAM), wl(1), seed=2)[1])
    assert a == b
    assert a["summary"]["tpot"] != c["summary"]["tpot"]  # other acceptance draws


def test_fp8_weights_lower_the_simulated_decode_step(db):
    bf16 = engine_settings(ModelSpec(dtype="bfloat16"), "cuda", 1)
    fp8 = engine_settings(ModelSpec(dtype="bfloat16", weight_dtype="fp8"), "cuda", 1)
    assert (fp8.dtype, fp8.kv_dtype) == ("fp8", "bfloat16")  # the KV cache keeps its dtype
    hw = profiles.hardware(db, "h100-sxm")
    t16 = profiles.step_model(db, SHAPE, hw, bf16).step_s(0, 0, 1, 1000)
    t8 = profiles.step_model(db, SHAPE, hw, fp8).step_s(0, 0, 1, 1000)
    # memory-bound: the weights' read halves, the step overhead stays
    assert t8 < 0.6 * t16 + hw.efficiency.step_overhead_s
    _, plain = run(db, config(), one_request())
    _, quant = run(db, config(weight_dtype="fp8"), one_request())
    assert quant["summary"]["tpot"]["p50"] < 0.7 * plain["summary"]["tpot"]["p50"]


def test_fp8_steps_come_from_measured_fp8_rows(tmp_path):
    db = ProfileDB(tmp_path / "p.db")
    fp8 = engine_settings(ModelSpec(dtype="bfloat16", weight_dtype="fp8"), "cuda", 1)
    rows = [StepSample(0, 0.0, 0, b, b * 500, 0.004 + 0.00001 * b) for b in (1, 8, 32, 64)]
    db.add_step_samples(SHAPE, "h100-sxm", fp8, rows)
    model = profiles.step_model(db, SHAPE, profiles.hardware(db, "h100-sxm"), fp8)
    assert "measured" in model.source
    assert model.step_s(0, 0, 8, 4000) == pytest.approx(0.00408, rel=0.05)


def test_the_estimate_and_the_simulator_share_the_fp8_rule(db):
    dev = resolve_devices(db, [Offer("h100-sxm", 1, None)])[0]
    assert engine_settings_for(dev, 1, "fp8", "auto") == engine_settings(
        ModelSpec(dtype="bfloat16", weight_dtype="fp8"), "cuda", 1)
    assert engine_settings_for(dev, 1, "bfloat16", "fp8") == engine_settings(
        ModelSpec(dtype="bfloat16", kv_cache_dtype="fp8"), "cuda", 1)


def test_the_acceptance_the_simulator_assumes_is_the_planners():
    assumed = ASSUMED_ACCEPTANCE["ngram"]
    assert SimOptions().acceptance("ngram") == assumed and SpaceSpec().spec_acceptance is None
    assert SimOptions(spec_acceptance_draft=0.4).acceptance("draft") == 0.4


def test_coalesced_runs_under_speculation_match_step_by_step(db):
    """Coalesced runs are entered only where the rule cannot speculate, so the
    acceptance draws and every token time are those of the step-by-step run."""
    wl = [TraceRequest(arrival_s=0.001 * i, input_len=32, output_len=30 + i % 50, hash_ids=())
          for i in range(300)]
    a = without_timing(run(db, config(NGRAM), wl, coalesce=True)[1])
    b = without_timing(run(db, config(NGRAM), wl, coalesce=False)[1])
    for rec in (a, b):
        rec["sim"].pop("events")
        rec.pop("options")
    assert a == b


def test_cli_simulate_takes_the_acceptance_rate(tmp_path, capsys):
    import yaml

    from splitserve.cluster.cli.main import main

    cfg = copy.deepcopy(BASE)
    cfg["models"][0]["model"]["speculative"] = NGRAM
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    common = ["simulate", "--config", str(path), "--shape", "llama-3.1-8b", "--hardware",
              "h100-sxm", "--rate", "2", "--num-requests", "10", "--db",
              str(tmp_path / "p.db"), "--no-plot", "--json"]
    assert main(common + ["--spec-acceptance", "0.9"]) == 0
    rec = json.loads(capsys.readouterr().out)
    spec = rec["pools"][f"{MODEL}-colocated"]["speculation"]
    assert spec["acceptance_assumed"] == 0.9 and spec["verify_steps"] > 0
    assert main(common + ["--spec-acceptance", "1.5"]) == 2
    assert "--spec-acceptance" in capsys.readouterr().err
