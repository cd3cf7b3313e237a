"""Engine settings per pool in planning: the planner searches each pool's
own batch cap and chunk size, the estimator scores each pool with its own,
the emitted YAML carries them per pool through the config loader and the
checks `splitserve deploy` runs, and the simulator runs each pool with them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import yaml

from splitserve.cluster.bench.datasets import parse_length_dist
from splitserve.cluster.config import load_config, parse_config
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.planner.emit import (
    EmitContext, EnginePlan, Plan, PoolEngine, PoolPlan, to_yaml)
from splitserve.cluster.planning.planner.inputs import SLO, Offer, synthetic_workload
from splitserve.cluster.planning.planner.request import PlanRequest
from splitserve.cluster.planning.planner.search import Planner
from splitserve.cluster.planning.planner.space import SpaceSpec
from splitserve.cluster.planning.shapes import PRESETS, ModelShape
from splitserve.cluster.planning.sim.pools import kv_blocks
from splitserve.cluster.planning.sim.options import engine_settings
from splitserve.engine.roles import Role

SHAPE = PRESETS["llama-3.1-8b"]
SPACE = SpaceSpec(layouts=("disaggregated",), max_num_seqs=(16, 256),
                  max_num_batched_tokens=(512, 8192), block_sizes=(16,), kv_dtypes=("auto",),
                  weight_dtypes=("bfloat16",), tensor_parallel=(1, 2), speculative=("off",),
                  policies=("round_robin",), local_prefill=(0,), autoscaling=("fixed",),
                  max_replicas=6)


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    # long prompts at a rate that keeps prefill replicas busy: the chunk size shows
    wl = synthetic_workload(12, parse_length_dist("lognormal:7.6:0.4:256:8000"),
                            parse_length_dist("lognormal:4.5:0.5:4:400"), window=120, sample=800)
    req = PlanRequest(SHAPE, "llama", "/models/llama", wl, SLO(1.5, 0.05),
                      [Offer("l40s", 8), Offer("a100-80gb", 8)], space=SPACE,
                      max_ppl_increase=None)
    p = Planner(req, ProfileDB(tmp_path_factory.mktemp("db") / "p.db"))
    p.analytic()
    return p


def _with(plan: Plan, role: str, **engine) -> Plan:
    pool = dict(plan.pools)[role]
    new = replace(pool, engine=replace(pool.engine, **engine))
    return replace(plan, **{role: new})


def test_candidates_pair_prefill_and_decode_settings_freely(planner):
    plans = [planner.to_plan(r) for r in planner.candidates[:400]]
    pairs = {(p.prefill.engine.max_num_batched_tokens, p.decode.engine.max_num_batched_tokens,
              p.decode.engine.max_num_seqs) for p in plans}
    # a prefill chunk is no longer tied to the decode pool's chunk or batch cap
    assert any(pre != dec for pre, dec, _ in pairs)
    for p in plans[:20]:
        assert p.predicted, p.label()  # predict() finds both pools' rows again
        # a prefill replica's batch cap lets its chunk fill with the workload's short prompts
        e = p.prefill.engine
        assert e.max_num_seqs * planner.ctx.short_prompt >= e.max_num_batched_tokens


def test_each_pools_settings_move_only_that_pools_prediction(planner):
    base = next(planner.to_plan(r) for r in planner.candidates
                if r["ok"] and planner.to_plan(r).prefill.replicas >= 2)
    small = _with(_with(base, "prefill", max_num_batched_tokens=512), "decode", max_num_seqs=16)
    big_chunk = _with(small, "prefill", max_num_batched_tokens=8192)
    more_seqs = _with(small, "decode", max_num_seqs=256)
    p_small, p_chunk, p_seqs = (planner.predict(p) for p in (small, big_chunk, more_seqs))
    assert p_small and p_chunk and p_seqs
    pre = lambda p: p["pools"]["prefill"]  # noqa: E731
    dec = lambda p: p["pools"]["decode"]  # noqa: E731
    # a larger prefill chunk: a full step carries more tokens per fixed step cost, so the
    # prefill pool serves more tokens per second and is less busy; decode is untouched
    assert pre(p_chunk)["tokens_per_s"] > pre(p_small)["tokens_per_s"]
    assert pre(p_chunk)["busy"] < pre(p_small)["busy"]
    assert dec(p_chunk) == dec(p_small)
    assert p_chunk["tpot_p"] == p_small["tpot_p"]
    # a larger decode batch cap: more slots per decode replica (less blocking);
    # the prefill pool's figures are untouched
    assert dec(p_seqs)["slots"] > dec(p_small)["slots"]
    assert dec(p_seqs)["blocking"] <= dec(p_small)["blocking"]
    assert pre(p_seqs) == pre(p_small)


def test_kv_memory_is_written_per_rank_as_the_engine_sizes_it(planner):
    """A pool's kv_cache_memory_gb is per tensor-parallel rank: the blocks the
    simulator (as the engine) derives from it hold the tokens the estimate counted."""
    from splitserve.cluster.config import ModelSpec

    u = planner.tables["decode"][0]
    for tp in (1, 2):
        i = int(np.flatnonzero((u.tp == tp) & u.mem_ok)[0])
        spec = ModelSpec(kv_cache_memory_gb=float(u.kv_gib[i]), block_size=int(u.block[i]),
                         tensor_parallel_size=tp, max_num_seqs=int(u.seqs[i]))
        blocks = kv_blocks(spec, SHAPE, engine_settings(spec, "cuda", tp))
        assert blocks * int(u.block[i]) == pytest.approx(float(u.kv_tokens[i]), rel=1e-6, abs=16)


def test_planned_pools_yaml_through_deploys_checks_and_the_simulator(tiny_llama, tmp_path):
    """Distinct prefill and decode settings survive load_config, a round trip,
    deploy's pre-flight (tensor-parallel split against the checkpoint, the
    Serve applications and their resources) and reach the simulator's replicas."""
    from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation
    from splitserve.cluster.serve.app import check_tensor_parallel, pool_apps

    plan = Plan("disaggregated",
                decode=PoolPlan(1, "a100-80gb", tp=1, replicas=2,
                                engine=PoolEngine(max_num_seqs=96, max_num_batched_tokens=1024,
                                                  kv_cache_memory_gb=0.5)),
                prefill=PoolPlan(0, "h100-sxm", tp=2, replicas=1,
                                 engine=PoolEngine(max_num_seqs=8, max_num_batched_tokens=4096,
                                                   kv_cache_memory_gb=0.125)),
                engine=EnginePlan(block_size=16, kv_cache_dtype="auto", weight_dtype="bfloat16",
                                  speculative="off"),
                policy="cost", local_prefill_max_tokens=0, autoscaling="fixed")
    ctx = EmitContext(model_name="tiny", model_path=str(tiny_llama), ttft_s=1.0, tpot_s=0.05,
                      trough=1.0, network_bytes_per_s=1e10, max_queue=64)
    path = tmp_path / "plan.yaml"
    path.write_text(to_yaml(plan, ctx))
    cfg = load_config(path)  # what `splitserve deploy` calls first
    assert parse_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg
    served = cfg.models[0]
    for role, pool in plan.pools:
        run = served.engine_spec(Role(role))
        assert (run.max_num_seqs, run.max_num_batched_tokens, run.kv_cache_memory_gb,
                run.tensor_parallel_size) == (pool.engine.max_num_seqs,
                                              pool.engine.max_num_batched_tokens,
                                              pool.engine.kv_cache_memory_gb, pool.tp)
    check_tensor_parallel(cfg)  # 4 heads, 2 KV heads: split by 2
    apps = pool_apps(served, cfg, "v0")
    for app, (role, bound) in apps.items():
        worker_model = bound._bound_deployment.init_args[1]  # what each replica builds
        want = dict(plan.pools)[role.value]
        assert worker_model["max_num_batched_tokens"] == want.engine.max_num_batched_tokens
        assert worker_model["max_num_seqs"] == want.engine.max_num_seqs
        assert bound._bound_deployment.ray_actor_options["num_gpus"] == want.tp
    # the simulator runs each pool with its own settings
    shape = ModelShape("tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                       num_kv_heads=2, head_dim=16, vocab_size=512)
    roles = {"prefill": "h100-sxm", "decode": "a100-80gb"}
    sim = Simulation(cfg, {"tiny": shape}, lambda m, r: roles[r],
                     ProfileDB(tmp_path / "p.db"), iter(()), SimOptions())
    pre, dec = sim.pools["tiny-prefill"], sim.pools["tiny-decode"]
    assert (pre.mspec.max_num_batched_tokens, dec.mspec.max_num_batched_tokens) == (4096, 1024)
    assert (pre.mspec.max_num_seqs, dec.mspec.max_num_seqs) == (8, 96)
    assert pre.num_blocks < dec.num_blocks  # 0.125 GB per rank against 0.5 GB


def test_estimate_counts_every_pair_of_pool_settings(tmp_path):
    """The estimate scores a prefill allocation once for all its chunk sizes:
    its count of combinations within the SLOs equals an enumeration of every
    deployable plan, each predicted on its own."""
    wl = synthetic_workload(6, parse_length_dist("lognormal:7.0:0.5:64:4000"),
                            parse_length_dist("lognormal:4.5:0.5:4:400"), window=120, sample=800)
    space = SPACE.replace(layouts=("colocated", "disaggregated"), tensor_parallel=(1,),
                          policies=("cost",), local_prefill=(0, 512), max_replicas=3)
    req = PlanRequest(SHAPE, "llama", "/models/llama", wl, SLO(0.4, 0.03),
                      [Offer("l40s", 3), Offer("a100-80gb", 2)], space=space,
                      max_ppl_increase=None)
    p = Planner(req, ProfileDB(tmp_path / "p.db"))
    p.analytic()
    plans = p.enumerate_plans()
    assert len(plans) == p.counts["space"]["deployable"]
    within = [x for x in plans if x.predicted.get("predicted_within_slo")]
    assert 0 < len(within) < len(plans)
    assert len(within) == p.counts["estimate"]["deployable"]
