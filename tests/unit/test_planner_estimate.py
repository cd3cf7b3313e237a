"""The planner's analytic estimator: queueing formulas, monotone in
replicas, memory bounds, and close to the simulator where it matters."""

import dataclasses
import math

import numpy as np
import pytest

from splitserve.cluster.bench.datasets import parse_length_dist
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.planner import queueing
from splitserve.cluster.planning.planner.inputs import (
    SLO, Offer, parse_offer, parse_slo, synthetic_workload, z_of)
from splitserve.cluster.planning.planner.request import PlanRequest
from splitserve.cluster.planning.planner.search import Planner
from splitserve.cluster.planning.planner.space import SpaceSpec
from splitserve.cluster.planning.shapes import PRESETS


def erlang_b_exact(c: int, a: float) -> float:
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


def test_erlang_formulas():
    # Erlang C exact against the textbook value: c = 2, a = 1 -> 1/3
    assert queueing.erlang_c(np.array([2]), np.array([1.0]), 4)[0] == pytest.approx(1 / 3)
    assert queueing.erlang_c(np.array([1]), np.array([0.7]), 4)[0] == pytest.approx(0.7)
    # Erlang B by the normal approximation, within a factor of the exact where it matters
    for c, a in ((100, 90.0), (512, 480.0), (64, 40.0)):
        exact = erlang_b_exact(c, a)
        approx = float(queueing.erlang_b(np.array([c]), np.array([a]))[0])
        assert approx == pytest.approx(exact, rel=0.5, abs=1e-4)


def test_inputs_parsing():
    assert parse_slo("200ms@p99") == (0.2, 99.0)
    assert parse_slo("1.5") == (1.5, 90.0)
    assert parse_offer("h100-sxm:8:2.5") == Offer("h100-sxm", 8, 2.5)
    assert parse_offer("l40s") == Offer("l40s", 16, None)
    assert z_of(90) == pytest.approx(1.2816, abs=1e-3)
    assert z_of(50) == pytest.approx(0.0, abs=1e-9)


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    db = ProfileDB(tmp_path_factory.mktemp("db") / "p.db")
    wl = synthetic_workload(30, parse_length_dist("lognormal:6.5:0.6:16:8000"),
                            parse_length_dist("lognormal:5:0.6:2:1000"), sample=1000, window=300)
    space = SpaceSpec(max_num_seqs=(64, 256), max_num_batched_tokens=(512, 4096),
                      block_sizes=(16,), kv_dtypes=("auto", "fp8"), weight_dtypes=("bfloat16",),
                      tensor_parallel=(1, 2), speculative=("off",), policies=("cost",),
                      local_prefill=(0, 512), autoscaling=("fixed",), max_replicas=8)
    req = PlanRequest(PRESETS["llama-3.1-8b"], "llama", None, wl, SLO(1.0, 0.05),
                      [Offer("h100-sxm", 8), Offer("l40s", 8)], space=space,
                      max_ppl_increase=None)
    p = Planner(req, db)
    p.analytic()
    return p


def test_more_replicas_never_estimate_slower(planner):
    for name in ("colocated", "decode"):
        t = planner.tables[name][3]
        tpot = np.where(t.bounds_ok, t.metrics["tpot_p"], np.inf)
        ok = t.bounds_ok
        # once a pool size is stable, a larger one is too, and not slower
        assert not np.any(ok[:, :, :-1] & ~ok[:, :, 1:] & (
            np.arange(1, ok.shape[2])[None, None, :] < planner.tables[name][0].cap[:, None, None]))
        both = ok[:, :, :-1] & ok[:, :, 1:]
        assert np.all(tpot[:, :, 1:][both] <= tpot[:, :, :-1][both] * (1 + 1e-9))
    t = planner.tables["prefill"][3]
    both = t.bounds_ok[:, :, :-1] & t.bounds_ok[:, :, 1:]
    ttft = t.metrics["ttft_p"]
    assert np.all(ttft[:, :, 1:][both] <= ttft[:, :, :-1][both] * (1 + 1e-9))


def one_setting_space(seqs=32, tensor_parallel=(1, 4), weight_dtypes=("bfloat16",)):
    """A space of one engine setting (bf16 KV, no speculation, the cost router, fixed
    replicas, at most 2), at the given batch cap, TP degrees and weight dtypes."""
    return SpaceSpec(max_num_seqs=(seqs,), max_num_batched_tokens=(512,), block_sizes=(16,),
                     kv_dtypes=("auto",), weight_dtypes=weight_dtypes,
                     tensor_parallel=tensor_parallel, speculative=("off",), policies=("cost",),
                     local_prefill=(0,), autoscaling=("fixed",), max_replicas=2)


def short_workload(rate=1, prompt="64", output="16"):
    return synthetic_workload(rate, parse_length_dist(prompt), parse_length_dist(output),
                              sample=100, window=10)


def test_memory_bound(tmp_path):
    db = ProfileDB(tmp_path / "p.db")
    wl, space = short_workload(), one_setting_space()
    req = PlanRequest(PRESETS["llama-3.1-70b"], "big", None, wl, SLO(5.0, 1.0),
                      [Offer("l40s", 8)], space=space)
    p = Planner(req, db)
    p.analytic()
    u = p.tables["colocated"][0]
    # 141 GB of bf16 weights: not on one 48 GB L40S, on four
    assert not u.mem_ok[u.tp == 1].any()
    assert u.mem_ok[u.tp == 4].all()


def test_counts_shrink_through_the_stages(planner):
    c = planner.counts
    for k in ("deployable", "modelled_only"):
        assert c["space"][k] >= c["bounds"][k] >= c["estimate"][k]
    assert c["estimate"]["deployable"] > 0


def test_estimate_tracks_the_simulator(planner):
    """The cheapest few estimated plans, simulated: TPOT within 35%, TTFT within
    a factor of 2.5 (the estimate ranks; the simulator decides)."""
    plans = planner.finalists()[:3]
    assert plans
    for plan in plans:
        out = planner.simulate(plan)
        pred = plan.predicted
        assert math.isfinite(out.tpot_p) and math.isfinite(out.ttft_p)
        assert pred["tpot_p"] == pytest.approx(out.tpot_p, rel=0.35)
        assert 1 / 2.5 <= pred["ttft_p"] / out.ttft_p <= 2.5


def test_the_estimate_reads_a_mixture_of_experts_as_the_step_model_does(tmp_path):
    # the planner's step arithmetic (numpy, every unit at once) against the step-time
    # model the simulator runs, for Mixtral: decode steps of 1-64 tokens read a share of
    # its experts, a prompt chunk all of them
    from types import SimpleNamespace

    from splitserve.cluster.planning import profiles
    from splitserve.cluster.planning.planner.estimate import _step
    from splitserve.cluster.planning.planner.units import Forms

    db = ProfileDB(tmp_path / "p.db")
    wl, space = short_workload(2, "256", "64"), one_setting_space(64, (2, 4))
    shape = PRESETS["mixtral-8x7b"]
    p = Planner(PlanRequest(shape, "moe", None, wl, SLO(5.0, 1.0), [Offer("h100-sxm", 8)],
                            space=space), db)
    p.analytic()
    assert p.forms._cache
    for (di, tp, wd, kv), (f, oh, _, _, settings, (unread, passes)) in p.forms._cache.items():
        model = profiles.step_model(db, shape, p.ctx.devices[di].hw, settings)
        assert model.routed_s > 0 and unread[1] == model.routed_s and passes == 0.75
        one = SimpleNamespace(forms=Forms(*(f[None, :, i] for i in range(5)), np.array([oh]),
                                          np.array([[True, False]]), unread[None], np.array([passes])))
        for n, ctx, q, a in ((1, 300, 0, 0), (8, 2000, 0, 0), (64, 500, 0, 0), (4, 900, 512, 512 * 256.5)):
            dec = [np.array([[[(f[k, 3] + f[k, 4] * ctx) * n]]]) for k in range(2)]
            got = np.asarray(_step(one, dec, q, a, n + q)).item()
            assert got == pytest.approx(model.step_s(q, a, n, n * ctx), rel=1e-9)
        skipped = model.step_s(0, 0, 1, 300) / dataclasses.replace(model, routed_s=0.0).step_s(0, 0, 1, 300)
        assert skipped < 0.45  # batch 1 reads 2 of 8 experts


def test_an_fp8_checkpoint_is_planned_in_fp8(tmp_path):
    # Llama-3.1-70B as an fp8 checkpoint: its 70 GB of weights fit one H200, which
    # its bf16 twin's 141 GB do not; fp8 is the only weight dtype to search, with no
    # quality cost against itself; the simulator times it in fp8 too
    import dataclasses

    from splitserve.cluster.config import ModelSpec
    from splitserve.cluster.planning.planner.quality import quality_increases
    from splitserve.cluster.planning.sim.options import engine_settings

    db = ProfileDB(tmp_path / "p.db")
    wl, space = short_workload(), one_setting_space(32, (1, 2), ("bfloat16", "fp8"))
    bf16 = PRESETS["llama-3.1-70b"]
    fp8 = dataclasses.replace(bf16, fp8_weights=True)
    assert fp8.key != bf16.key  # measured rows of one are not the other's
    one_gpu_fits = {}
    for shape in (bf16, fp8):
        req = PlanRequest(shape, "big", None, wl, SLO(5.0, 1.0), [Offer("h200", 2)], space=space,
                          max_ppl_increase=None)
        p = Planner(req, db)
        p.analytic()
        assert req.space.weight_dtypes == (("fp8",) if shape.fp8_weights else ("bfloat16", "fp8"))
        u = p.tables["colocated"][0]
        wd = np.array([req.space.weight_dtypes[w] for w in p.ctx.grid.wd])[u.e]
        one_gpu_fits[shape.fp8_weights] = {d: bool(u.mem_ok[(u.tp == 1) & (wd == d)].all())
                                           for d in set(wd)}
    assert one_gpu_fits == {False: {"bfloat16": False, "fp8": True}, True: {"fp8": True}}
    assert quality_increases(db, fp8, space) == {("fp8", "auto"): 0.0}
    spec = ModelSpec(dtype="bfloat16")
    assert engine_settings(spec, "cuda", 1, fp8_checkpoint=True).dtype == "fp8"
    assert engine_settings(spec, "cuda", 1).dtype == "bfloat16"
    assert engine_settings(ModelSpec(), "cpu", 1, fp8_checkpoint=True).dtype == "float32"
