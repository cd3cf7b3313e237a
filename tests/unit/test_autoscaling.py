"""Autoscaling decisions from constructed metric series: exact targets,
reasons, delays, cooldown and bounds; the Serve policy adapter on Ray
Serve's own context and wrapper."""

import msgspec
import pytest

from splitserve.cluster.autoscaling import serve_policy
from splitserve.cluster.autoscaling import signals as m
from splitserve.cluster.autoscaling.decision import DelayState, decide, desired_replicas
from splitserve.cluster.config import AutoscalingSpec
from tests.fixtures.worker_stats import decode_stats, engine_load, prefill_stats


def spec(bottleneck="compute", **kw):
    base = dict(upscale_delay_s=0.0, downscale_delay_s=0.0, cooldown_s=0.0, look_back_s=10.0,
                metrics_interval_s=1.0)
    base.update(kw)
    return AutoscalingSpec(bottleneck=bottleneck, **base)


def gauge(value, t0=90.0, t1=100.0, step=2.0):
    n = int(round((t1 - t0) / step)) + 1
    return [(t0 + i * step, float(value)) for i in range(n)]


def counter(rate, t0=90.0, t1=100.0, step=2.0, start=0.0):
    n = int(round((t1 - t0) / step)) + 1
    return [(t0 + i * step, start + rate * i * step) for i in range(n)]


def prefill_series(pending, busy_rate, tokens_per_busy_s, replicas=("a", "b"), **kw):
    return {m.PENDING_PROMPT_TOKENS: {r: gauge(pending, **kw) for r in replicas},
            m.BUSY_TIME_S: {r: counter(busy_rate, **kw) for r in replicas},
            m.PROMPT_TOKENS_COMPUTED: {r: counter(busy_rate * tokens_per_busy_s, **kw)
                                       for r in replicas}}


# -- compute ---------------------------------------------------------------------
def test_compute_scales_on_predicted_queueing_delay():
    # 2 replicas x 3000 pending tokens, each 1000 tokens per busy second:
    # delay 6000 / 2000 = 3 s vs 1 s -> value 3 -> ceil(2 * 3) = 6 -> max 4
    s = prefill_series(3000, 0.5, 1000)
    d = decide(s, spec(target_ttft_s=1.0), current=2, min=1, max=4, now=100.0)
    assert (d.target, d.desired, d.bottleneck_value) == (4, 4, 3.0)
    assert d.reason == ("scale up 2 -> 4: predicted queueing delay 3.000s vs target 1s "
                        "(6000 pending prompt tokens at 2000 tokens/s)")
    assert d.prefer_local_prefill is None


def test_compute_busy_fraction_dominates_when_queue_is_short():
    # no queue; engine loops busy 90% of the time vs 60% target -> 1.5 -> ceil(3) = 3
    s = prefill_series(0, 0.9, 1000)
    d = decide(s, spec(target_busy_fraction=0.6), current=2, min=1, max=8, now=100.0)
    assert (d.target, d.bottleneck_value) == (3, 1.5)
    assert d.reason == "scale up 2 -> 3: busy 90% vs target 60%"


def test_compute_gpu_utilization_counts_when_reported():
    s = prefill_series(0, 0.1, 1000)
    s[m.GPU_UTILIZATION] = {"a": gauge(0.95), "b": gauge(0.85)}
    d = decide(s, spec(target_busy_fraction=0.5), current=2, min=1, max=8, now=100.0)
    assert (d.target, d.bottleneck_value) == (4, 1.8)
    assert d.reason == "scale up 2 -> 4: GPU utilization 90% vs target 50%"


def test_compute_uses_lifetime_throughput_when_idle_in_window():
    # busy/tokens counters flat in the window (no work) but 4000 tokens over 2
    # busy seconds in the replica's life: 2000 tok/s; 500 pending -> 0.25 s
    s = {m.PENDING_PROMPT_TOKENS: {"a": gauge(500)},
         m.BUSY_TIME_S: {"a": gauge(2.0)},
         m.PROMPT_TOKENS_COMPUTED: {"a": gauge(4000.0)}}
    d = decide(s, spec(target_ttft_s=0.1), current=1, min=1, max=8, now=100.0)
    assert (d.target, d.bottleneck_value) == (3, 2.5)
    assert d.reason.startswith("scale up 1 -> 3: predicted queueing delay 0.250s")


def test_idle_pool_scales_down_to_min():
    s = prefill_series(0, 0.0, 1000, replicas=("a", "b", "c"))
    d = decide(s, spec(), current=3, min=1, max=4, now=100.0)
    assert (d.target, d.desired, d.bottleneck_value) == (1, 1, 0.0)
    assert d.reason == "scale down 3 -> 1: busy 0% vs target 80%"


# -- memory ------------------------------------------------------------------------
def decode_series(free, total, running, max_seqs, replicas=("a", "b"), busy_rate=0.0,
                  step_rate=0.0):
    return {m.KV_USED_FRACTION: {r: gauge(1 - free / total) for r in replicas},
            m.SEQ_FRACTION: {r: gauge(running / max_seqs) for r in replicas},
            m.BUSY_TIME_S: {r: counter(busy_rate) for r in replicas},
            m.DECODE_STEPS: {r: counter(step_rate) for r in replicas}}


def test_memory_scales_on_kv_usage():
    s = decode_series(free=10, total=100, running=4, max_seqs=8)
    d = decide(s, spec("memory", target_kv_usage=0.75), current=2, min=1, max=8, now=100.0)
    assert (d.target, d.bottleneck_value) == (3, 1.2)
    assert d.reason == "scale up 2 -> 3: KV usage 90% vs target 75%"


def test_memory_scales_on_running_sequences():
    s = decode_series(free=90, total=100, running=8, max_seqs=8)
    d = decide(s, spec("memory", target_seq_fraction=0.5), current=2, min=1, max=8, now=100.0)
    assert (d.target, d.bottleneck_value) == (4, 2.0)
    assert d.reason == "scale up 2 -> 4: running sequences 100% of max vs target 50%"


def test_memory_tpot_target():
    # 0.5 busy s per wall s over 10 steps per wall s: 50 ms per token vs 20 ms
    s = decode_series(free=90, total=100, running=1, max_seqs=8, replicas=("a",), busy_rate=0.5,
                      step_rate=10.0)
    d = decide(s, spec("memory", target_tpot_s=0.02), current=1, min=1, max=8, now=100.0)
    assert (d.target, d.bottleneck_value) == (3, 2.5)
    assert d.reason == "scale up 1 -> 3: time per output token 50.0ms vs target 20.0ms"
    # without a TPOT target the same load is within the KV / sequence targets
    d = decide(s, spec("memory"), current=1, min=1, max=8, now=100.0)
    assert (d.target, d.bottleneck_value) == (1, 0.1667)
    assert d.reason == "hold at 1: running sequences 12% of max vs target 75%"


# -- network ---------------------------------------------------------------------------
def test_network_scales_and_signals_local_prefill():
    s = {m.HANDOFF_BYTES: {"a": counter(1e9)}}
    sp = spec("network", link_bytes_per_s=1.25e9, target_link_utilization=0.4)
    d = decide(s, sp, current=1, min=1, max=4, now=100.0)
    assert (d.target, d.bottleneck_value, d.prefer_local_prefill) == (2, 2.0, True)
    assert d.reason == ("scale up 1 -> 2: hand-off 1000.0 MB/s per replica vs target 500.0 MB/s "
                        "(40% of link)")
    quiet = {m.HANDOFF_BYTES: {"a": counter(1e8), "b": counter(3e8)}}
    d = decide(quiet, sp, current=2, min=1, max=4, now=100.0)
    assert (d.target, d.bottleneck_value, d.prefer_local_prefill) == (1, 0.4, False)


def test_local_prefill_signal_switches_off_only_after_calm_for_the_downscale_delay():
    sp = spec("network", link_bytes_per_s=1e9, target_link_utilization=0.5, downscale_delay_s=3.0)
    hot, calm = {m.HANDOFF_BYTES: {"a": counter(6e8)}}, {m.HANDOFF_BYTES: {"a": counter(1e8)}}
    st, seen = DelayState(), []
    for now, s in [(100, calm), (101, hot), (102, calm), (104, calm), (105, hot), (106, calm),
                   (108, calm), (109, calm)]:
        d = decide(shifted(s, now - 100), sp, current=1, min=1, max=1, now=float(now), state=st)
        st = d.state
        seen.append(d.prefer_local_prefill)
    # on at once (101, 105); off after 3 s calm (102 -> 105 was interrupted; 106 -> 109)
    assert seen == [False, True, True, True, True, True, True, False]
    assert (st.prefer_local, st.calm_since) == (False, None)


# -- delays, cooldown, bounds ------------------------------------------------------------
def shifted(series, dt):
    return {k: {r: [(t + dt, v) for t, v in pts] for r, pts in per.items()}
            for k, per in series.items()}


def test_upscale_waits_for_the_condition_to_hold_for_the_whole_delay():
    hot, calm = prefill_series(3000, 0.5, 1000), prefill_series(0, 0.5, 1000)
    sp = spec(upscale_delay_s=5.0, target_busy_fraction=0.8)
    st = DelayState()
    targets = []
    for now, s in [(100, hot), (103, hot), (104, calm), (105, hot), (109, hot), (110, hot)]:
        d = decide(shifted(s, now - 100), sp, current=2, min=1, max=4, now=float(now), state=st)
        st = d.state
        targets.append((now, d.target))
    # the calm tick at 104 restarts the clock: 105 + 5 s = 110
    assert targets == [(100, 2), (103, 2), (104, 2), (105, 2), (109, 2), (110, 4)]
    assert st == DelayState(0, None, 110.0)


def test_waiting_reason_counts_down():
    sp = spec(upscale_delay_s=5.0)
    d = decide(prefill_series(3000, 0.5, 1000), sp, current=2, min=1, max=4, now=100.0)
    assert d.target == 2 and d.state == DelayState(1, 100.0, None)
    assert d.reason.startswith("scale up to 4 in 5.0s if it persists: predicted queueing delay")
    d = decide(shifted(prefill_series(3000, 0.5, 1000), 2), sp, current=2, min=1, max=4,
               now=102.0, state=d.state)
    assert d.reason.startswith("scale up to 4 in 3.0s if it persists")


def test_downscale_delay_and_cooldown_after_a_change():
    sp = spec(downscale_delay_s=2.0, cooldown_s=10.0)
    idle = prefill_series(0, 0.0, 1000, replicas=("a", "b", "c", "d"))
    st = DelayState(last_change=105.0)  # scaled up to 4 at t=105
    seen = []
    for now in (106, 108, 114, 115):
        d = decide(shifted(idle, now - 100), sp, current=4, min=1, max=4, now=float(now),
                   state=st)
        st = d.state
        seen.append((now, d.target, d.reason.split(":")[0]))
    assert seen == [(106, 4, "scale down to 1 in 2.0s if it persists"),
                    (108, 4, "scale down to 1 after 7.0s cooldown"),
                    (114, 4, "scale down to 1 after 1.0s cooldown"),
                    (115, 1, "scale down 4 -> 1")]
    assert st == DelayState(0, None, 115.0)


def test_direction_flip_restarts_the_delay():
    sp = spec(upscale_delay_s=3.0, downscale_delay_s=3.0)
    hot, idle = prefill_series(3000, 0.5, 1000), prefill_series(0, 0.0, 1000)
    d1 = decide(hot, sp, current=2, min=1, max=4, now=100.0)
    d2 = decide(shifted(idle, 2), sp, current=2, min=1, max=4, now=102.0, state=d1.state)
    d3 = decide(shifted(idle, 4), sp, current=2, min=1, max=4, now=104.0, state=d2.state)
    d4 = decide(shifted(idle, 5), sp, current=2, min=1, max=4, now=105.0, state=d3.state)
    assert [d.target for d in (d1, d2, d3, d4)] == [2, 2, 2, 1]
    assert d2.state == DelayState(-1, 102.0, None)


def test_bounds_edited_below_current_apply_at_once():
    s = prefill_series(3000, 0.5, 1000)
    sp = spec(upscale_delay_s=60, downscale_delay_s=60, cooldown_s=60)
    d = decide(s, sp, current=5, min=1, max=3, now=100.0, state=DelayState(last_change=99.0))
    assert (d.target, d.reason) == (3, "bounds are now [1, 3]: 5 -> 3")
    d = decide(s, sp, current=1, min=2, max=3, now=100.0)
    assert (d.target, d.reason) == (2, "bounds are now [2, 3]: 1 -> 2")


def test_at_max_holds_and_says_so():
    d = decide(prefill_series(3000, 0.5, 1000), spec(), current=4, min=1, max=4, now=100.0)
    assert d.target == 4
    assert d.reason.startswith("hold at 4 (at max_replicas): predicted queueing delay 3.000s")


def test_no_metrics_holds_and_resets_the_delay():
    sp = spec(upscale_delay_s=5.0)
    d = decide({}, sp, current=2, min=1, max=4, now=100.0, state=DelayState(1, 90.0, 50.0))
    assert (d.target, d.bottleneck_value) == (2, None)
    assert d.reason == "hold at 2: no metrics from the replicas in the last 10s"
    assert d.state == DelayState(0, None, 50.0)
    # samples older than the look-back window do not count
    stale = prefill_series(3000, 0.5, 1000, t0=60.0, t1=80.0)
    d = decide(stale, sp, current=2, min=1, max=4, now=100.0)
    assert d.reason == "hold at 2: no metrics from the replicas in the last 10s"


def test_desired_replicas_rounds_up_and_shrinks_only_with_headroom():
    # 2 replicas at 50% of target: one replica would run at 100% > 90% headroom
    assert [desired_replicas(2, v, 2) for v in (0.0, 0.4, 0.5, 1.0, 1.01, 3.0)] == \
        [0, 1, 2, 2, 3, 6]


def test_no_downscale_while_new_replicas_start():
    # target 3 but one replica still starting: the two running ones are calm,
    # which says nothing yet about whether three are needed
    calm = prefill_series(0, 0.3, 1000)
    d = decide(calm, spec(), current=3, min=1, max=4, now=100.0, running=2)
    assert (d.target, d.desired) == (3, 1)
    assert d.reason == "hold at 3: 1 replica(s) still starting; busy 30% vs target 80%"
    assert d.state == DelayState()
    d = decide(calm, spec(), current=3, min=1, max=4, now=100.0, running=3)
    assert d.reason == "scale down 3 -> 1: busy 30% vs target 80%"
    # starting replicas do not hold back a scale-up
    d = decide(prefill_series(3000, 0.5, 1000), spec(), current=3, min=1, max=8, now=100.0,
               running=2)
    assert d.target == 6


def test_delay_state_round_trip():
    st = DelayState(-1, 12.5, 3.0)
    assert DelayState.from_dict(st.to_dict()) == st
    assert DelayState.from_dict(None) == DelayState() == DelayState.from_dict({})


# -- replica metrics ----------------------------------------------------------------------
def test_replica_metrics_from_worker_stats():
    from splitserve.cluster.observability.telemetry import DeviceSample, GpuTelemetry

    prefill = prefill_stats(engine_load(
        pending_prompt_tokens=120, running=2, waiting=3, free_blocks=30, total_blocks=40,
        prompt_tokens_computed=999, busy_time_s=1.5), bytes_sent=4096)
    gpu = GpuTelemetry(True, devices=[DeviceSample(i, "gpu", util, 0.0, 1, 2, None)
                                      for i, util in enumerate((50.0, 70.0))])
    assert m.replica_metrics(prefill, gpu=gpu) == {
        "kv_used_fraction": 0.25, "running": 2.0, "waiting": 3.0, "busy_time_s": 1.5,
        "draining": 0.0, "pending_prompt_tokens": 120.0, "prompt_tokens_computed": 999.0,
        "handoff_bytes": 4096.0, "gpu_utilization": 0.6}
    decode = decode_stats(engine_load(
        free_blocks=48, total_blocks=64, running=3, waiting=0, max_seqs=4, busy_time_s=2.0,
        steps=77, pending_prompt_tokens=5), handoff_bytes=1 << 20)
    assert m.replica_metrics(decode, draining=True, gpu=GpuTelemetry(False, "no GPU")) == {
        "kv_used_fraction": 0.25, "running": 3.0, "waiting": 0.0, "busy_time_s": 2.0,
        "draining": 1.0, "pending_prompt_tokens": 5.0, "seq_fraction": 0.75,
        "decode_steps": 77.0, "handoff_bytes": float(1 << 20)}


# -- the Serve policy on Serve's own context --------------------------------------------
def serve_context(series, spec_: AutoscalingSpec, target=2, running=2, lo=1, hi=4, now=100.0,
                  state=None):
    from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    dep = DeploymentID(name="tiny-prefill", app_name="tiny-prefill")
    cfg = AutoscalingConfig(min_replicas=lo, max_replicas=hi, upscale_delay_s=0,
                            downscale_delay_s=0, policy={
                                "policy_function": serve_policy.POLICY_PATH,
                                "policy_kwargs": {"spec": spec_.model_dump(), "role": "prefill",
                                                  "model": "tiny"}})
    ids = {r: ReplicaID(unique_id=r, deployment_id=dep)
           for per in series.values() for r in per}
    raw = {name: {ids[r]: [TimeStampedValue(t, v) for t, v in pts] for r, pts in per.items()}
           for name, per in series.items()}
    return AutoscalingContext(
        deployment_id=dep, deployment_name=dep.name, app_name=dep.app_name,
        current_num_replicas=running, target_num_replicas=target,
        running_replicas=list(ids.values()), total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=None, raw_metrics=raw, capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=now, config=cfg)


def test_serve_policy_adapts_context_and_keeps_delay_state():
    sp = spec(upscale_delay_s=4.0)
    hot = prefill_series(3000, 0.5, 1000)
    target, state = serve_policy.bottleneck_policy(serve_context(hot, sp))
    assert target == 2
    assert state[serve_policy.STATE_KEY] == {"direction": 1, "since": 100.0, "last_change": None,
                                             "prefer_local": False, "calm_since": None}
    target, state = serve_policy.bottleneck_policy(
        serve_context(shifted(hot, 4), sp, now=104.0, state=state))
    assert target == 4
    assert state[serve_policy.STATE_KEY] == {"direction": 0, "since": None, "last_change": 104.0,
                                             "prefer_local": False, "calm_since": None}


def test_serve_policy_through_serves_wrapper_yields_our_target():
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    wrapped = _apply_autoscaling_config(serve_policy.bottleneck_policy)
    idle = prefill_series(0, 0.0, 1000, replicas=("a", "b", "c"))
    target, state = wrapped(serve_context(idle, spec(), target=3, running=3))
    assert target == 1
    assert state[serve_policy.STATE_KEY]["last_change"] == 100.0


def test_decision_record_for_the_ledger():
    sp = spec()
    d = decide(prefill_series(3000, 0.5, 1000), sp, current=2, min=1, max=4, now=100.0)
    rec = serve_policy.decision_record("tiny-prefill", {"spec": sp.model_dump(), "role": "prefill",
                                                        "model": "tiny"}, d, 2, 2, 1, 4, 100.0)
    assert msgspec.to_builtins(rec) == {
        "app": "tiny-prefill", "model": "tiny", "role": "prefill", "bottleneck": "compute",
        "time": 100.0, "running": 2, "current": 2, "target": 4, "desired": 4, "value": 3.0,
        "reason": d.reason, "min": 1, "max": 4, "changed": True, "prefer_local_prefill": None}


@pytest.mark.parametrize("bad", [dict(look_back_s=1.0, metrics_interval_s=1.0),
                                 dict(target_busy_fraction=1.5)])
def test_spec_rejects_inconsistent_windows_and_targets(bad):
    with pytest.raises(ValueError):
        AutoscalingSpec(bottleneck="compute", **bad)


# -- GPU telemetry -----------------------------------------------------------------------
def _has_nvidia_gpu() -> bool:
    import shutil
    from pathlib import Path

    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def test_gpu_telemetry_matches_the_machine():
    from splitserve.cluster.observability.telemetry import read_gpu_telemetry

    t = read_gpu_telemetry()
    if not _has_nvidia_gpu():
        assert not t.available and t.devices == []
        assert t.reason.startswith("NVML is unavailable on this node: ")
        assert t.to_dict() == {"available": False, "reason": t.reason}
        return
    assert t.available and t.devices
    for i, dev in enumerate(t.devices):
        assert dev.index == i and 0 <= dev.utilization_gpu <= 100
        assert 0 < dev.memory_used_bytes <= dev.memory_total_bytes
    assert set(t.to_dict()["devices"][0]) == {
        "index", "name", "utilization_gpu", "utilization_memory", "memory_used_bytes",
        "memory_total_bytes", "power_w"}
    bad = read_gpu_telemetry([len(t.devices) + 7])
    assert bad.to_dict() == {"available": False, "reason": (
        f"GPU indices [{len(t.devices) + 7}] do not exist; NVML sees {len(t.devices)} device(s)")}


def test_replica_gpu_telemetry_outside_ray_does_not_start_ray():
    import ray

    from splitserve.cluster.observability.telemetry import GpuTelemetry, replica_gpu_telemetry

    assert replica_gpu_telemetry() == GpuTelemetry(False, "not running in a Ray worker")
    assert not ray.is_initialized()
