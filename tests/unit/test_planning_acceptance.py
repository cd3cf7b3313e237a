"""Speculative decoding's acceptance in the profile database: the table and
its migration, rows measured through the engine's speculative path, and the
planner and simulator reading them (else the assumed rate, saying so); the
estimate drafts the length the engine's rule settles on at each batch size."""

import json
import random

import numpy as np
import pytest

from splitserve.cluster.bench.datasets import parse_length_dist
from splitserve.cluster.planning import profile_run, profiler, spec_probe
from splitserve.cluster.planning.acceptance import (
    ASSUMED_ACCEPTANCE, length_table, per_token_rate, resolve, settled_length)
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.db_schema import SCHEMA_VERSION
from splitserve.cluster.planning.planner.inputs import SLO, Offer, synthetic_workload
from splitserve.cluster.planning.planner.request import PlanRequest
from splitserve.cluster.planning.planner.search import Planner
from splitserve.cluster.planning.planner.space import SpaceSpec
from splitserve.cluster.planning.records import MEASURED, SpecAcceptance
from splitserve.cluster.planning.shapes import PRESETS
from splitserve.engine.default_model import DEFAULT_MODEL_NAME, default_model_path
from splitserve.engine.spec.adaptive import LengthRule, expected_tokens, step_curve

LLAMA = PRESETS["llama-3.1-8b"]


def row(rate, workload="free", method="ngram", k=4, **kw):
    return SpecAcceptance(method=method, draft="ngram:1-4", workload=workload, k=k,
                          acceptance=rate, acceptance_rate=rate / 2,
                          mean_accepted_length=1 + rate, draft_tokens=1000,
                          tokens_per_step=expected_tokens(rate, k), steps=400, **kw)


# -- the table ---------------------------------------------------------------------------
def test_a_version_1_file_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    with ProfileDB(path) as db:
        db.add_startup(LLAMA, "h100-sxm", 12.5)
        db.conn.execute("DROP TABLE speculation")  # as version 1 wrote it
        db.conn.execute("PRAGMA user_version = 1")
        db.conn.commit()
    with ProfileDB(path) as db:
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert db.startup_s(LLAMA.key, "h100-sxm") == (12.5, MEASURED)
        assert db.speculation(LLAMA.key) == []
        db.add_speculation(LLAMA, row(0.3))
        assert [r.acceptance for r in db.speculation(LLAMA.name, "ngram")] == [0.3]


def older_file(path, shape, columns, version):
    """A database file as ``version`` wrote it: ``shape`` stored, ``columns``
    of the models table not there yet."""
    with ProfileDB(path) as db:
        db.put_model(shape)
        for col in columns:
            db.conn.execute(f"ALTER TABLE models DROP COLUMN {col}")
        db.conn.execute(f"PRAGMA user_version = {version}")
        db.conn.commit()
    return path


def test_a_version_2_file_gains_num_cache_layers_and_keeps_its_models(tmp_path):
    # version 2's models table had no num_cache_layers: opening the file adds it (0: every
    # layer), and a hybrid shape stored then reads back with its attention layers
    import dataclasses

    path = older_file(tmp_path / "v2.db", LLAMA, ["num_cache_layers"], 2)
    hybrid = dataclasses.replace(LLAMA, name="hybrid", num_cache_layers=LLAMA.num_layers // 4)
    with ProfileDB(path) as db:
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.model(LLAMA.key) == LLAMA
        db.put_model(hybrid)
        assert db.model("hybrid") == hybrid
        assert db.model("hybrid").kv_bytes_per_token("bfloat16") * 4 == LLAMA.kv_bytes_per_token("bfloat16")


def test_a_version_3_file_gains_counts_and_states_and_keeps_its_models(tmp_path):
    # version 3's models table had no parameter counts, states or context length: opening
    # the file adds them as 0 (unknown: the formulas), a shape counted since fills its old
    # row in, and a hybrid with its states round-trips
    import dataclasses

    from splitserve.cluster.planning.db_schema import ADDED_COLUMNS

    v4 = [c for c in ADDED_COLUMNS["models"] if c != "num_cache_layers"]
    path = older_file(tmp_path / "v3.db", LLAMA, v4, 3)
    counted = dataclasses.replace(LLAMA, params_total=8_030_261_248, params_active=7_504_924_672,
                                  max_position=131072)
    hybrid = PRESETS["qwen3-next-80b-a3b"]
    with ProfileDB(path) as db:
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        old = db.model(LLAMA.key)
        assert old == LLAMA and old.num_params == LLAMA.num_params  # the formula, as before
        assert counted.key == LLAMA.key  # the counts leave the key as it was
        assert db.put_model(counted) == db.put_model(LLAMA)
        assert db.model(LLAMA.key) == counted and db.model(LLAMA.key).num_params == 8_030_261_248
        db.put_model(hybrid)
        back = db.model(hybrid.key)
        assert back == hybrid and back.state_bytes_per_sequence("bfloat16") == 77_266_944
        assert db.conn.execute("SELECT num_params FROM models WHERE key = ?",
                               (hybrid.key,)).fetchone()[0] == hybrid.params_total


def test_a_version_5_file_gains_the_routed_experts_count(tmp_path):
    # a mixture of experts counted before its routed experts were: read as unknown (its
    # steps read every weight), filled in when the shape is counted again
    import dataclasses

    hybrid = PRESETS["qwen3-next-80b-a3b"]
    path = older_file(tmp_path / "v5.db", hybrid, ["params_routed", "fp8_weights"], 5)
    with ProfileDB(path) as db:
        old = db.model(hybrid.key)
        assert old == dataclasses.replace(hybrid, params_routed=0) and old.routed_params == 0
        db.put_model(hybrid)
        assert db.model(hybrid.key) == hybrid and db.model(hybrid.key).routed_params == 77_309_411_328


def test_rows_keep_every_field_and_come_back_best_first(tmp_path):
    with ProfileDB(tmp_path / "p.db") as db:
        first = row(0.4, dataset="heldout.txt", source="splitserve profile")
        db.add_speculation(LLAMA, first, host="h1")
        db.add_speculation(LLAMA, row(0.2, "code-edit"))
        got = db.speculation(LLAMA.key, "ngram", "free")
        assert got == [first]
        rec = db.conn.execute("SELECT host, provenance, created_at FROM speculation "
                              "ORDER BY id").fetchone()
        assert rec["host"] == "h1" and rec["provenance"] == "measured" and rec["created_at"] > 0
        assert db.speculation(LLAMA.key, "draft") == []
    with pytest.raises(ValueError, match="method"):
        row(0.3, method="medusa")
    with pytest.raises(ValueError, match="acceptance"):
        row(1.3)


def test_per_token_rate_inverts_expected_tokens():
    for a in (0.0, 0.23, 0.7, 0.95):
        assert per_token_rate(expected_tokens(a, 4), 4) == pytest.approx(a, abs=1e-6)
    assert per_token_rate(0.9, 4) == 0.0 and per_token_rate(5.0, 4) == 1.0


# -- which rate ---------------------------------------------------------------------------
def test_resolve_prefers_the_workload_then_the_lowest_then_the_assumption():
    db = ProfileDB(":memory:")
    a = resolve(db, LLAMA.key, "ngram")
    assert (a.rate, a.source) == (ASSUMED_ACCEPTANCE["ngram"], "assumed")
    assert a.describe().startswith("assumed 0.70")
    db.add_speculation(LLAMA, row(0.62, "code-edit"))
    db.add_speculation(LLAMA, row(0.23, "chat"))
    assert resolve(db, LLAMA.key, "ngram", "code-edit").rate == 0.62
    low = resolve(db, LLAMA.key, "ngram")
    assert (low.rate, low.source, low.workload) == (0.23, "measured", "chat")
    assert low.describe().startswith("measured 0.23 (profile: chat")
    # a workload never measured: the most conservative of those that were
    assert resolve(db, LLAMA.key, "ngram", "rag").rate == 0.23
    assert resolve(db, LLAMA.key, "draft").source == "assumed"


# -- measured through the engine ------------------------------------------------------------
@pytest.mark.slow
def test_profile_measures_acceptance_through_the_engines_speculative_path(tmp_path):
    import torch

    torch.set_num_threads(1)  # as `splitserve profile --threads 1`; two threads only contend here
    db = ProfileDB(tmp_path / "p.db")
    target = profile_run.targets(None, None)[0]
    methods = profile_run.spec_methods(target, True)
    assert [m.method for m in methods] == ["ngram", "draft"]  # the shipped pair
    ngram = methods[:1]
    rows = spec_probe.run(db, target.shape, dict(target.engine_kwargs, device="cpu"), ngram,
                          profiler.HELDOUT_PATH, fast=True, log=lambda s: None)
    assert [(r.method, r.workload) for r in rows] == [("ngram", "code-edit"), ("ngram", "free")]
    for r in rows:
        assert r.k == 4 and r.steps > 0 and r.draft_tokens > 0 and r.provenance == MEASURED
        # the fitted rate reproduces what the engine yielded per step
        assert expected_tokens(r.acceptance, r.k) == pytest.approx(r.tokens_per_step, rel=1e-6)
    edit, free = rows
    # the code-edit prompts hold the output: lookup finds far more of it there
    assert edit.tokens_per_step > free.tokens_per_step
    stored = db.speculation(DEFAULT_MODEL_NAME, "ngram")
    assert {r.workload for r in stored} == {"code-edit", "free"}
    assert resolve(db, target.shape.key, "ngram").rate == min(edit.acceptance, free.acceptance)


def test_copy_fraction_counts_what_prompt_lookup_predicts():
    # 7 follows 5 6 earlier in the prompt; 9 was never seen; the second 5 6 7 repeats
    prompt = [1, 5, 6, 7, 2, 5, 6]
    assert spec_probe.copy_fraction(prompt, [7, 9]) == 0.5
    assert spec_probe.copy_fraction(prompt, [7, 2, 5]) == 1.0
    assert spec_probe.copy_fraction(prompt, [3, 3]) == 0.0  # no 3 has followed a 3 before
    assert spec_probe.copy_fraction(prompt, []) == 0.0


def test_refined_rewrite_prompts_are_copied_more_than_the_code_edit_ones():
    import torch

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)
    plain = LLMEngine(EngineConfig(model=str(default_model_path()), device="cpu",
                                   num_blocks=512, enable_prefix_caching=False))
    text = profiler.HELDOUT_PATH.read_text(encoding="utf-8")
    prefixes = spec_probe.corpus_prefixes(plain.tokenizer, text, 4, 24)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def fraction(prompts):
        outs = [o.token_ids for o in plain.generate(prompts, sp)]
        return np.mean([spec_probe.copy_fraction(p, o) for p, o in zip(prompts, outs)])

    edit = spec_probe.copy_prompts(plain, prefixes, 32)
    rewrite = spec_probe.copy_prompts(plain, prefixes, 32, rounds=4)
    assert [len(p) for p in rewrite] == [len(p) for p in edit]
    # each prompt is prefix + body + blank line + prefix
    assert all(p[:24] == q[:24] and p[-24:] == q[-24:] for p, q in zip(edit, rewrite))
    assert fraction(rewrite) > fraction(edit)
    assert fraction(rewrite) >= 0.7


def test_a_config_that_speculates_is_measured_by_default(tmp_path):
    import yaml

    cfg = {"name": "c", "models": [{"mode": "colocated",
                                    "model": {"name": "m", "path": str(default_model_path()),
                                              "speculative": {"method": "ngram",
                                                              "num_speculative_tokens": 3}},
                                    "decode": {"min_replicas": 1, "max_replicas": 1}}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t = profile_run.targets(None, str(path))[0]
    assert [(m.method, m.k) for m in profile_run.spec_methods(t, None)] == [("ngram", 3)]
    assert profile_run.spec_methods(t, False) == []
    plain = profile_run.targets(None, None)[0]
    assert profile_run.spec_methods(plain, None) == []  # the default run stays fast


def test_cli_imports_a_bench_spec_record(tmp_path, capsys):
    from splitserve.cluster.cli.main import main

    rec = {"benchmark": "spec", "settings": {"k": 4, "fixed": False}, "results": [
        {"case": "copy / ngram, fixed k", "batch": 1, "acceptance_rate": 0.5,
         "mean_accepted_length": 3.0, "draft_tokens": 400},
        {"case": "free / shipped draft, fixed k", "batch": 8, "acceptance_rate": 0.25,
         "mean_accepted_length": 2.0, "draft_tokens": 800},
        {"case": "copy / ngram", "batch": 1, "acceptance_rate": 0.9,  # adaptive: skipped
         "mean_accepted_length": 4.0, "draft_tokens": 40}]}
    src = tmp_path / "spec.json"
    src.write_text(json.dumps(rec))
    db_path = tmp_path / "p.db"
    assert main(["profile", "--spec-import", str(src), "--db", str(db_path)]) == 0
    db = ProfileDB(db_path)
    ngram, = db.speculation(DEFAULT_MODEL_NAME, "ngram")
    assert (ngram.workload, ngram.source, ngram.acceptance_rate) == ("code-edit", str(src), 0.5)
    # 100 runs of 4 drafts, 2 accepted on average: the per-token rate with E = 3
    assert ngram.acceptance == pytest.approx(per_token_rate(3.0, 4))
    draft, = db.speculation(DEFAULT_MODEL_NAME, "draft")
    assert draft.workload == "free" and draft.draft.startswith("default-draft-v2@")
    capsys.readouterr()
    assert main(["profile", "--list", "--json", "--db", str(db_path)]) == 0
    assert len(json.loads(capsys.readouterr().out)["speculation"]) == 2
    src.write_text("{}")
    assert main(["profile", "--spec-import", str(src), "--db", str(db_path)]) == 2


# -- the engine's length rule in the estimate -------------------------------------------------
def test_the_settled_length_is_where_the_engines_rule_settles():
    """The engine's LengthRule, its tracker fed the verify steps of a batch
    of ``b`` sequences whose drafts are accepted at a (geometric draws),
    settles on the length the estimate tabulates, at every batch size."""
    # (rates away from a tie between two lengths at those batch sizes: the
    # tracker's moving average wanders a few hundredths either side)
    for a, device, batches in ((0.7, "cuda", (1, 64, 100, 128, 300)), (0.6, "cpu", (1,)),
                               (0.7, "cpu", (2, 8)), (0.85, "cpu", (32,)), (0.3, "cpu", (1, 8, 32))):
        table = length_table(4, a, device, 300)
        sat = step_curve(None, device)
        for b in batches:
            rule = LengthRule(4, sat)
            rng = random.Random(b)
            ks = []
            for _ in range(400):
                k = rule.length(b, True)
                ks.append(k)
                if not k:
                    continue
                accepted = rejected = 0
                for _ in range(b):
                    acc = 0
                    while acc < k and rng.random() < a:
                        acc += 1
                    accepted += acc
                    rejected += acc < k
                rule.tracker.observe(b * k, accepted, None, 1.0, rejected=rejected)
            settled = max(set(ks[-100:]), key=ks[-100:].count)
            assert table.k[b] == settled == settled_length(4, b, a, sat), (a, device, b)
    t = length_table(4, 0.7, "cuda", 512)
    # a batch large enough that verifying costs more than it yields drafts less, then none
    assert t.k[1] == 4 and 0 < t.k[100] < 4 and t.k[300] == 0
    assert t.tokens[300] == 1.0 and t.tokens[1] == pytest.approx(expected_tokens(0.7, 4))


def chat_request(space, offers, slo=SLO(2.0, 0.025)):
    wl = synthetic_workload(10, parse_length_dist("lognormal:8.3:0.4:512:16000"),
                            parse_length_dist("lognormal:4.5:0.5:4:512"), window=200,
                            sample=1000)
    return PlanRequest(LLAMA, "llama", None, wl, slo, offers, space=space)


SMALL = SpaceSpec(layouts=("colocated",), max_num_seqs=(64, 512), max_num_batched_tokens=(4096,),
                  block_sizes=(16,), kv_dtypes=("auto",), weight_dtypes=("bfloat16",),
                  tensor_parallel=(1,), policies=("least_loaded",), autoscaling=("fixed",),
                  max_replicas=8)


def cheapest(planner):
    planner.analytic()
    c = planner.candidates
    ok = c[c["ok"] & c["dep"]]
    return planner.to_plan(ok[np.argmin(ok["cost"])]) if len(ok) else None


def test_measured_low_acceptance_changes_the_plan():
    offers = [Offer("l40s", 8), Offer("h100-sxm", 8, price=10.0)]
    assumed = Planner(chat_request(SMALL, offers), ProfileDB(":memory:"))
    plan = cheapest(assumed)
    # at the assumed 0.7, n-gram lookup is what lets an L40S decode within 25 ms
    assert plan.decode.hardware == "l40s" and plan.engine.speculative == "ngram:4"
    assert assumed.ctx.acceptance["ngram"].source == "assumed"
    db = ProfileDB(":memory:")
    db.add_speculation(LLAMA, row(0.1, "chat"))
    measured = Planner(chat_request(SMALL, offers), db)
    assert measured.ctx.acceptance["ngram"].describe().startswith("measured 0.10")
    plan = cheapest(measured)
    assert plan.decode.hardware == "h100-sxm"  # no L40S plan is estimated within the SLO


def test_the_simulator_draws_with_the_measured_rate_and_says_so():
    from splitserve.cluster.config import parse_config
    from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation
    from splitserve.cluster.planning.workload import TraceRequest

    cfg = parse_config({
        "name": "s", "models": [{"mode": "colocated",
                                 "model": {"name": "llama", "path": "/nowhere", "dtype": "bfloat16",
                                           "kv_cache_memory_gb": 8,
                                           "speculative": {"method": "ngram"}},
                                 "decode": {"min_replicas": 1, "max_replicas": 1,
                                            "num_gpus": 1}}],
        "router": {"policy": "least_loaded"}})
    db = ProfileDB(":memory:")
    db.add_speculation(LLAMA, row(0.15, "chat"))
    db.add_speculation(LLAMA, row(0.65, "code-edit"))

    def sim(**opts):
        wl = [TraceRequest(arrival_s=0.0, input_len=64, output_len=100, hash_ids=())]
        s = Simulation(cfg, {"llama": LLAMA}, lambda m, r: "h100-sxm", db, wl,
                       SimOptions(**opts))
        return s, s.run().record["pools"]["llama-colocated"]["speculation"]

    s, rec = sim()
    assert (s.acceptance["llama"].rate, rec["acceptance_source"]) == (0.15, "measured")
    assert rec["acceptance"].startswith("measured 0.15")
    _, rec = sim(spec_workload="code-edit")
    assert rec["acceptance_assumed"] == 0.65
    _, rec = sim(spec_acceptance_ngram=0.9)
    assert (rec["acceptance_assumed"], rec["acceptance_source"]) == (0.9, "given")


def test_the_estimate_drafts_by_the_rule_at_its_batch_size():
    planner = Planner(chat_request(SMALL, [Offer("h100-sxm", 8)], SLO(2.0, 0.1)),
                      ProfileDB(":memory:"))
    planner.analytic()
    u, _, _, t = planner.tables["colocated"]
    n, k = t.metrics["n"], t.metrics["spec_k"]
    spec = np.array([planner.space.speculative[s] != "off" for s in planner.grid.spec[u.e]])
    table = length_table(4, 0.7, "cuda", max(SMALL.max_num_seqs))
    sel = spec[:, None, None] & np.isfinite(n) & (n < 512)
    want = table.k[np.clip(np.rint(n[sel]), 0, 512).astype(int)]
    assert np.array_equal(k[sel], want)
    assert (k[~np.broadcast_to(spec[:, None, None], k.shape)] == 0).all()
    # speculation drafting nothing at the estimated batch is speculation off: no candidate
    idle = np.broadcast_to(spec[:, None, None], k.shape) & (k == 0)
    assert idle.any() and not t.est_ok[idle].any()


def test_cli_plan_reports_where_its_acceptance_came_from(tmp_path, capsys):
    from splitserve.cluster.cli.main import main

    db_path = tmp_path / "p.db"
    with ProfileDB(db_path) as db:
        db.add_speculation(LLAMA, row(0.23, "chat"))
    out = tmp_path / "out"
    args = ["plan", "--shape", "llama-3.1-8b", "--hardware", "h100-sxm:2", "--rate", "2",
            "--input-len", "256", "--output-len", "64", "--ttft", "1", "--tpot", "50ms",
            "--layouts", "colocated", "--max-num-seqs", "64", "--max-num-batched-tokens",
            "2048", "--block-sizes", "16", "--kv-dtypes", "auto", "--weight-dtypes", "bfloat16",
            "--tensor-parallel", "1", "--speculative", "ngram:4", "--policies", "least_loaded",
            "--autoscaling", "fixed", "--max-replicas", "2", "--finalists", "1", "--max-sims",
            "1", "--sim-requests", "40", "--quiet", "--no-plot", "--db", str(db_path)]
    assert main(args + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speculation acceptance: ngram measured 0.23 (profile: chat" in text
    assert "Speculation ngram:4: acceptance measured 0.23" in text
    rec = json.loads((out / "plan.json").read_text())
    assert rec["speculation_acceptance"]["ngram"]["source"] == "measured"
    assert main(args + ["--spec-acceptance", "0.5"]) == 0
    assert "speculation acceptance: ngram given 0.50" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a usage error naming the flag
        main(args + ["--spec-acceptance", "2"])
    assert e.value.code == 2
    assert "--spec-acceptance: must be from 0 to 1" in capsys.readouterr().err


def test_a_draft_models_rows_are_its_own():
    db = ProfileDB(":memory:")
    db.add_speculation(LLAMA, row(0.2, method="draft"))  # drafted by "ngram:1-4"'s stand-in
    assert resolve(db, LLAMA.key, "draft").rate == 0.2
    assert resolve(db, LLAMA.key, "draft", draft="other@0123").source == "assumed"
    assert resolve(db, LLAMA.key, "draft", draft="ngram:1-4").rate == 0.2
