"""The simulator: deterministic for a seed, and built from the production
decision code (RouterCore and its policies, the autoscaling decision, the
engine Scheduler), so that changing that code changes the simulation."""

import json

import msgspec
import pytest

from splitserve.cluster.autoscaling import decision
from splitserve.cluster.bench.datasets import parse_length_dist
from splitserve.cluster.config import parse_config
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.samples import MOONCAKE
from splitserve.cluster.planning.shapes import PRESETS
from splitserve.cluster.planning.sim import adapter
from splitserve.cluster.planning.sim.options import Failure, SimOptions
from splitserve.cluster.planning.sim.simulator import Simulation
from splitserve.cluster.planning.workload import synthetic
from splitserve.engine.scheduler import Scheduler
from splitserve.router import policies
from splitserve.router.core import RouterCore

MODEL = "llama"
CONFIG = {
    "name": "sim-test",
    "models": [{
        "model": {"name": MODEL, "path": "/nowhere/llama", "dtype": "bfloat16",
                  "kv_cache_memory_gb": 8, "max_num_seqs": 64, "max_num_batched_tokens": 2048},
        "prefill": {"min_replicas": 1, "max_replicas": 3, "num_gpus": 1,
                    "autoscaling": {"bottleneck": "compute", "target_ttft_s": 0.05,
                                    "upscale_delay_s": 2, "downscale_delay_s": 20,
                                    "cooldown_s": 2, "look_back_s": 4, "metrics_interval_s": 1}},
        "decode": {"min_replicas": 1, "max_replicas": 3, "num_gpus": 1,
                   "autoscaling": {"bottleneck": "memory", "target_kv_usage": 0.5,
                                   "upscale_delay_s": 2, "downscale_delay_s": 20,
                                   "cooldown_s": 2, "look_back_s": 4, "metrics_interval_s": 1}},
    }],
    "router": {"policy": "cost", "local_prefill_max_tokens": 256},
    "slo": {"ttft_s": 0.5, "tpot_s": 0.05},
}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return ProfileDB(tmp_path_factory.mktemp("db") / "p.db")


def simulate(db, cfg=CONFIG, n=300, rate=30.0, seed=0, **opts):
    wl = synthetic(rate, parse_length_dist("uniform:64:1200"), parse_length_dist("uniform:8:200"),
                   seed=seed, num_requests=n)
    sim = Simulation(parse_config(cfg), {MODEL: PRESETS["llama-3.1-8b"]},
                     lambda m, r: "h100-sxm", db, wl, SimOptions(seed=seed, **opts))
    return sim, sim.run().record


def without_timing(rec):
    rec = json.loads(json.dumps(rec, default=str))
    for k in ("wall_s", "cpu_s", "speed_x_real_time", "speed_x_real_time_cpu"):
        rec["sim"].pop(k)
    return rec


def test_same_seed_same_run_other_seed_other_run(db):
    a = without_timing(simulate(db, seed=1)[1])
    b = without_timing(simulate(db, seed=1)[1])
    c = without_timing(simulate(db, seed=2)[1])
    assert a == b
    assert a["summary"] != c["summary"]
    assert a["summary"]["completed"] == 300


def test_the_simulation_runs_the_production_objects(db, monkeypatch):
    calls = {"route": 0, "decide": 0, "schedule": 0}
    route, decide, schedule = RouterCore.route, decision.decide, Scheduler.schedule

    def spy(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper
    monkeypatch.setattr(RouterCore, "route", spy("route", route))
    monkeypatch.setattr(decision, "decide", spy("decide", decide))
    monkeypatch.setattr(Scheduler, "schedule", spy("schedule", schedule))
    sim, rec = simulate(db, n=100)
    assert type(sim.router) is RouterCore
    assert all(type(s.rep.sched) is Scheduler for s in sim.replicas.values())
    assert calls["route"] == 100 and calls["decide"] > 0 and calls["schedule"] > 0
    assert rec["router"]["decisions"] == 100


def test_a_policy_change_changes_the_placements(db, monkeypatch):
    _, before = simulate(db, n=200)
    assert before["router"]["by_reason"].get("remote_cheaper", 0) > 0

    def always_local(req, snap, matches, cfg, state):  # cost's decode pick, prefill on it
        p = policies.cost_policy(req, snap, matches, cfg, state)
        return msgspec.structs.replace(p, prefill_replica=None, reason="always_local")
    monkeypatch.setitem(policies.POLICIES, "cost", always_local)
    _, after = simulate(db, n=200)
    assert after["router"]["by_reason"] == {"always_local": 200}
    assert after["network"]["transfers"] == 0 and after["summary"]["local_prefill_share"] == 1.0
    assert after["summary"]["ttft"] != before["summary"]["ttft"]


def test_the_autoscaler_scales_the_pools_up_under_load(db):
    _, rec = simulate(db, n=2500, rate=150.0)
    events = [e for p in rec["pools"].values() for e in p["scale_events"]]
    assert events and all(e["to"] > e["from"] for e in events[:1])
    assert any("scale up" in e["reason"] for e in events)
    assert max(p["peak_replicas"] for p in rec["pools"].values()) > 1


def test_a_failed_decode_replica_is_survived_and_replaced(db):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["models"][0]["decode"].update(min_replicas=2, autoscaling=None)
    sim, rec = simulate(db, cfg=cfg, n=300, failures=(Failure(3.0, "decode"),),
                        replace_after_s=2.0)
    assert rec["summary"]["failed"] == 0 and rec["summary"]["completed"] == 300
    assert sum(sim.log.retries) > 0
    decode = sim.pools[f"{MODEL}-decode"]
    assert len(decode.slots) == 3 and decode.slots[-1].launched_at == pytest.approx(5.0, abs=0.6)


def test_adapter_router_config_matches_the_deployed_one():
    from splitserve.cluster.config import load_config
    from splitserve.cluster.serve.app import router_config

    cfg = load_config("deploy/configs/local.yaml")
    deployed = router_config(cfg)
    kv = {name: facts.kv_bytes_per_token for name, facts in deployed.models.items()}
    assert adapter.router_config(cfg, kv) == deployed


def test_cli_simulate_writes_the_record_and_plots(tmp_path, capsys):
    from splitserve.cluster.cli.main import main

    out = tmp_path / "out"
    rc = main(["simulate", "--config", "deploy/configs/gpu-llama3-8b.yaml", "--shape",
               "llama-3.1-8b", "--hardware", "h100-sxm", "--pool-hardware", "decode=h200",
               "--trace", str(MOONCAKE), "--num-requests", "40", "--db", str(tmp_path / "p.db"),
               "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["summary"]["completed"] == 40
    assert rec["pools"]["llama-3-8b-instruct-decode"]["profile"]["hardware"] == "h200"
    assert rec["cost"]["usd"] > 0
    assert (out / "simulation.png").stat().st_size > 10_000
    assert len((out / "requests.csv").read_text().splitlines()) == 41
    assert "SLO attainment" in capsys.readouterr().out


def test_cli_simulate_explains_a_missing_shape(tmp_path, capsys):
    from splitserve.cluster.cli.main import main

    rc = main(["simulate", "--config", "deploy/configs/gpu-llama3-8b.yaml", "--hardware",
               "h100-sxm", "--rate", "1", "--num-requests", "1", "--db", str(tmp_path / "p.db")])
    assert rc == 2
    assert "--shape NAME=PRESET" in capsys.readouterr().err


def test_each_pool_runs_its_own_engine_settings(db):
    import copy

    cfg = copy.deepcopy(CONFIG)
    cfg["models"][0]["prefill"]["engine"] = {"max_num_seqs": 4, "max_num_batched_tokens": 4096}
    cfg["models"][0]["decode"]["engine"] = {"max_num_seqs": 128, "num_blocks": 5000}
    sim, _ = simulate(db, cfg=cfg, n=50)
    pre, dec = sim.pools[f"{MODEL}-prefill"], sim.pools[f"{MODEL}-decode"]
    assert (pre.mspec.max_num_seqs, pre.mspec.max_num_batched_tokens) == (4, 4096)
    assert (dec.mspec.max_num_seqs, dec.mspec.max_num_batched_tokens) == (128, 2048)
    assert dec.num_blocks == 5000 and pre.num_blocks != 5000
    scheds = {s.rep.sched.max_num_seqs for s in sim.replicas.values()}
    assert scheds == {4, 128}


def test_ended_requests_leave_no_cyclic_garbage_and_the_collector_is_restored(db):
    """A run tunes the cyclic garbage collector down because ended requests
    are freed by reference counting; a cycle left behind per request would
    make that a leak. The collector's settings come back after the run."""
    import gc

    from splitserve.cluster.planning.sim.serving import SimRequest

    before = gc.get_threshold()
    gc.collect()
    gc.disable()
    try:
        _, rec = simulate(db, n=200)
        assert rec["summary"]["completed"] == 200
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, SimRequest)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == []
    assert gc.get_threshold() == before
