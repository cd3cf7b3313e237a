"""The queue-length-only policy (``bottleneck: requests``, Ray Serve's
default): running + waiting requests per replica against
``target_ongoing_requests``, from the metrics replicas really report, in the
decision code, the operator YAML, the Serve policy and the simulator."""

import json

import pytest

from splitserve.cluster.autoscaling import serve_policy
from splitserve.cluster.autoscaling import signals as m
from splitserve.cluster.autoscaling.decision import decide
from splitserve.cluster.config import AutoscalingSpec, ConfigError, parse_config
from tests.fixtures.worker_stats import decode_stats, engine_load
from tests.unit.test_autoscaling import gauge, serve_context, spec


def ongoing_series(per_replica: dict[str, tuple[int, int]]):
    """replica -> (running, waiting), as their metric series over the window."""
    return {m.RUNNING: {r: gauge(run) for r, (run, _) in per_replica.items()},
            m.WAITING: {r: gauge(wait) for r, (_, wait) in per_replica.items()}}


def test_scales_up_to_total_ongoing_over_target():
    # (3 + 3) and (2 + 0) ongoing: mean 4 per replica vs 2 -> ceil(8 / 2) = 4
    s = ongoing_series({"a": (3, 3), "b": (2, 0)})
    d = decide(s, spec("requests", target_ongoing_requests=2), current=2, min=1, max=8, now=100.0)
    assert (d.target, d.desired, d.bottleneck_value) == (4, 4, 2.0)
    assert d.reason == "scale up 2 -> 4: 4.0 ongoing requests per replica vs target 2"
    assert d.prefer_local_prefill is None


def test_scales_down_with_headroom_and_holds_on_target():
    quiet = ongoing_series({"a": (1, 0), "b": (0, 0), "c": (0, 0)})
    d = decide(quiet, spec("requests", target_ongoing_requests=1), current=3, min=1, max=4,
               now=100.0)
    # 1 ongoing in all: one replica would run at 1.0 > 0.9 headroom -> 2
    assert (d.target, d.bottleneck_value) == (2, 0.3333)
    on_target = ongoing_series({"a": (2, 0), "b": (1, 1)})
    d = decide(on_target, spec("requests", target_ongoing_requests=2), current=2, min=1, max=4,
               now=100.0)
    assert d.target == 2 and d.reason.startswith("hold at 2: 2.0 ongoing")


def test_the_window_averages_each_gauge():
    # a replica with 8 waiting for the last 2 of 6 samples averages 8/3 waiting
    s = {m.RUNNING: {"a": gauge(0)},
         m.WAITING: {"a": [(90.0 + 2 * i, 8.0 if i >= 4 else 0.0) for i in range(6)]}}
    d = decide(s, spec("requests", target_ongoing_requests=1), current=1, min=1, max=8, now=100.0)
    assert d.bottleneck_value == pytest.approx(8 / 3, abs=1e-4) and d.target == 3


def test_blind_to_request_cost_where_memory_is_not():
    # one long request filling 95% of the KV cache: memory scales, requests holds
    stats = decode_stats(engine_load(free_blocks=5, total_blocks=100, running=1, max_seqs=8))
    metrics = m.replica_metrics(stats)
    s = {name: {"a": gauge(v)} for name, v in metrics.items()}
    mem = decide(s, spec("memory", target_kv_usage=0.75), current=1, min=1, max=4, now=100.0)
    req = decide(s, spec("requests", target_ongoing_requests=2), current=1, min=1, max=4,
                 now=100.0)
    assert mem.target == 2
    assert (req.target, req.bottleneck_value) == (1, 0.5)


def test_no_running_or_waiting_metrics_holds():
    s = {m.KV_USED_FRACTION: {"a": gauge(0.9)}}
    d = decide(s, spec("requests"), current=2, min=1, max=4, now=100.0)
    assert d.target == 2 and d.reason == "hold at 2: no requests metrics yet"


def test_operator_yaml_selects_it_per_pool():
    cfg = parse_config({"models": [{"decode": {
        "min_replicas": 1, "max_replicas": 3,
        "autoscaling": {"bottleneck": "requests", "target_ongoing_requests": 4}}}]})
    auto = cfg.models[0].decode.autoscaling
    assert (auto.bottleneck, auto.target_ongoing_requests) == ("requests", 4.0)
    assert cfg.models[0].prefill.autoscaling.bottleneck == "compute"
    with pytest.raises(ConfigError, match="target_ongoing_requests"):
        parse_config({"models": [{"decode": {"autoscaling": {
            "bottleneck": "requests", "target_ongoing_requests": 0}}}]})
    with pytest.raises(ConfigError, match="bottleneck"):
        parse_config({"models": [{"decode": {"autoscaling": {"bottleneck": "queue"}}}]})


def test_serve_policy_runs_it_and_records_the_bottleneck():
    sp = spec("requests", target_ongoing_requests=2)
    ctx = serve_context(ongoing_series({"a": (4, 2), "b": (4, 2)}), sp)
    target, state = serve_policy.bottleneck_policy(ctx)
    assert target == 4  # 12 ongoing / 2 = 6, clamped to max 4
    d = decide(ongoing_series({"a": (4, 2), "b": (4, 2)}), sp, 2, 1, 4, 100.0)
    rec = serve_policy.decision_record("tiny-decode", {"spec": sp.model_dump(), "role": "decode",
                                                       "model": "tiny"}, d, 2, 2, 1, 4, 100.0)
    assert rec.bottleneck == "requests" and rec.target == 4


def test_the_simulator_scales_a_pool_on_it(tmp_path):
    from splitserve.cluster.planning.db import ProfileDB
    from tests.unit.test_planning_sim import CONFIG, simulate

    cfg = json.loads(json.dumps(CONFIG))
    cfg["models"][0]["decode"]["autoscaling"] = {
        "bottleneck": "requests", "target_ongoing_requests": 4, "upscale_delay_s": 1,
        "downscale_delay_s": 20, "cooldown_s": 1, "look_back_s": 2, "metrics_interval_s": 0.5}
    _, rec = simulate(ProfileDB(tmp_path / "p.db"), cfg=cfg, n=400, rate=60.0)
    decode = rec["pools"]["llama-decode"]
    assert decode["autoscaling"] == "requests"
    ups = [e for e in decode["scale_events"] if e["to"] > e["from"]]
    assert ups and "ongoing requests per replica vs target 4" in ups[0]["reason"]
    assert decode["peak_replicas"] > 1


def test_spec_default_target_is_serves():
    assert AutoscalingSpec(bottleneck="requests").target_ongoing_requests == 2.0
