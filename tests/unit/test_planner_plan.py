"""``splitserve plan`` end to end on spaces small enough to simulate
exhaustively: the choice costs within 5% of the exhaustive best at equal
SLOs, its YAML is what ``splitserve deploy`` accepts, and the quality floor
keeps settings without quality rows out."""

import pytest
import yaml

from splitserve.cluster.bench.datasets import parse_length_dist
from splitserve.cluster.config import load_config, parse_config
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.planner.emit import to_yaml
from splitserve.cluster.planning.planner.inputs import SLO, Offer, synthetic_workload
from splitserve.cluster.planning.planner.quality import quality_increases
from splitserve.cluster.planning.planner.request import PlanRequest
from splitserve.cluster.planning.planner.search import Planner
from splitserve.cluster.planning.planner.space import SpaceSpec
from splitserve.cluster.planning.records import EngineSettings
from splitserve.cluster.planning.shapes import PRESETS
from splitserve.engine.roles import Role

SHAPE = PRESETS["llama-3.1-8b"]
TINY = SpaceSpec(max_num_seqs=(64,), max_num_batched_tokens=(2048,), block_sizes=(16,),
                 kv_dtypes=("auto",), weight_dtypes=("bfloat16",), tensor_parallel=(1,),
                 speculative=("off",), policies=("cost",), local_prefill=(0,),
                 autoscaling=("fixed",), max_replicas=3)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return ProfileDB(tmp_path_factory.mktemp("db") / "p.db")


def request(space=TINY, **kw):
    wl = synthetic_workload(6, parse_length_dist("lognormal:7.0:0.5:64:4000"),
                            parse_length_dist("lognormal:4.5:0.5:4:400"), window=120, sample=800)
    args = dict(space=space, finalists=6, max_sims=12, max_ppl_increase=None)
    args.update(kw)
    return PlanRequest(SHAPE, "llama", "/models/llama", wl, SLO(0.4, 0.02),
                       [Offer("l40s", 3), Offer("a100-80gb", 2)], **args)


@pytest.fixture(scope="module")
def planned(db):
    planner = Planner(request(), db)
    return planner, planner.search()


def test_choice_within_5_percent_of_exhaustive_best(planned):
    planner, res = planned
    plans = planner.enumerate_plans()
    assert len(plans) == planner.counts["space"]["deployable"] == 21
    outcomes = [planner.simulate(p) for p in plans]
    ok = [o for o in outcomes if o.meets]
    assert ok, "the test's SLOs should be reachable"
    best = min(o.cost_per_hour for o in ok)
    assert max(o.cost_per_hour for o in outcomes) > best  # the space is not trivial
    assert res.chosen is not None
    assert res.chosen.meets
    assert res.chosen.cost_per_hour <= best * 1.05
    # and it simulated far fewer plans than the space holds
    assert res.counts["simulated"] < len(plans)


def test_chosen_yaml_is_what_deploy_takes(planned, tmp_path):
    planner, res = planned
    text = to_yaml(res.chosen.plan, planner.emit_ctx)
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    cfg = load_config(path)  # what `splitserve deploy` calls first
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again == cfg
    m = cfg.models[0]
    plan = res.chosen.plan
    assert m.mode == plan.layout
    assert m.decode.min_replicas == m.decode.max_replicas == plan.decode.replicas
    for role, pool in plan.pools:  # each pool runs its own engine settings
        run = m.engine_spec(Role(role))
        assert run.max_num_batched_tokens == pool.engine.max_num_batched_tokens
        assert run.max_num_seqs == pool.engine.max_num_seqs
    assert cfg.slo.ttft_s == 0.4 and cfg.slo.tpot_s == 0.02


def test_explanation_and_pareto(planned):
    from splitserve.cluster.planning.planner import report

    planner, res = planned
    lines = report.explanation(res)
    assert lines[0].startswith("Chosen: ")
    front = report.pareto(res.outcomes, res.request.slo)
    assert res.chosen in front
    text = report.table(front, res.request.slo, res.chosen)
    assert "*" in text.splitlines()[2 + front.index(res.chosen)][:2]


def test_quality_floor_excludes_unknown_settings(db, tmp_path):
    space = TINY.replace(kv_dtypes=("auto", "fp8"), max_replicas=2)
    floor = Planner(request(space, max_ppl_increase=0.0), db)
    floor.analytic()
    assert all(r["q"] == 0 for r in floor.candidates)  # fp8 KV has no quality row: excluded
    free = Planner(request(space, max_ppl_increase=None), db)
    free.analytic()
    assert any(r["q"] != r["q"] for r in free.candidates)  # NaN: unknown, allowed without floor
    # with quality rows (fp8 KV within 1% of the bf16 KV on the same device), it is allowed
    qdb = ProfileDB(tmp_path / "q.db")
    ref = EngineSettings(dtype="bfloat16", kv_dtype="bfloat16")
    fp8 = EngineSettings(dtype="bfloat16", kv_dtype="fp8")
    qdb.add_quality(SHAPE, ref, "perplexity", 10.0, "heldout.txt", 1000)
    qdb.add_quality(SHAPE, fp8, "perplexity", 10.05, "heldout.txt", 1000)
    assert quality_increases(qdb, SHAPE, space)[("bfloat16", "fp8")] == pytest.approx(0.005)
    ok = Planner(request(space, max_ppl_increase=0.01), qdb)
    ok.analytic()
    assert any(r["q"] == pytest.approx(0.005) for r in ok.candidates)
    strict = Planner(request(space, max_ppl_increase=0.001), qdb)
    strict.analytic()
    assert all(r["q"] == 0 for r in strict.candidates)


def test_diurnal_workload_scales_down_in_troughs(db):
    from splitserve.cluster.planning.workload import Diurnal

    wl = synthetic_workload(6, parse_length_dist("lognormal:7.0:0.5:64:4000"),
                            parse_length_dist("lognormal:4.5:0.5:4:400"), window=120, sample=800,
                            diurnal=Diurnal(86400, 1.5, 0.3))
    space = TINY.replace(autoscaling=("fixed", "scale-down", "burst"), layouts=("colocated",),
                         max_replicas=3)
    req = PlanRequest(SHAPE, "llama", "/models/llama", wl, SLO(0.4, 0.03),
                      [Offer("l40s", 3), Offer("a100-80gb", 3)], space=space, finalists=3,
                      max_sims=6, max_ppl_increase=None)
    assert wl.peak_rate == pytest.approx(9.0) and not wl.steady
    planner = Planner(req, db)
    res = planner.search()
    c = res.chosen
    assert c is not None and c.plan.autoscaling == "scale-down"
    assert c.cost_per_hour < c.peak_cost_per_hour  # paid over the curve, sized for the peak
    cfg = parse_config(yaml.safe_load(to_yaml(c.plan, planner.emit_ctx)))
    pool = cfg.models[0].decode
    if c.plan.decode.replicas > 1:
        assert pool.min_replicas < pool.max_replicas == c.plan.decode.replicas
    assert pool.autoscaling is not None and pool.autoscaling.bottleneck == "memory"


def test_table_and_choice_name_each_pools_tp_degree(planned):
    # a pool at TP 2 holds twice the devices: the table's pools column and
    # the chosen line must say so, or a 1:1 plan's price reads as 3 devices'
    import dataclasses

    from splitserve.cluster.planning.planner import report

    planner, res = planned
    o = res.chosen
    plan = o.plan
    wide = dataclasses.replace(plan, decode=dataclasses.replace(plan.decode, tp=2))
    text = report.table([dataclasses.replace(o, plan=wide)], res.request.slo, None)
    assert f"{plan.decode.replicas}x{plan.decode.hardware} tp2" in text.splitlines()[2]
    assert " tp2" not in report.table([o], res.request.slo, None).splitlines()[2]
