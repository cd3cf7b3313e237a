"""The Ray Serve custom autoscaling policy of every splitserve pool.

Serve's controller calls ``bottleneck_policy(ctx)`` on each control-loop
tick. It reads the pool's ``AutoscalingSpec`` from the policy kwargs that
``worker_deployment`` set, turns the replicas' raw metric series (reported by
``WorkerServer.record_autoscaling_stats``) into a ``PoolSeries``, lets
``decision.decide`` choose the target, and keeps the delay bookkeeping in
``ctx.policy_state``. Serve's own delays are configured to zero: the delays
here are the operator's.

Serve pickles this module by value; what it imports (``cluster.*``) must be
importable on the head node (installed, or on PYTHONPATH).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from splitserve.cluster.autoscaling.records import DecisionRecord
from splitserve.cluster.autoscaling import publish
from splitserve.cluster.autoscaling.decision import Decision, DelayState, PoolSeries, decide
from splitserve.cluster.config import AutoscalingSpec
from splitserve.cluster.observability.metrics import record_autoscaler_decision

log = logging.getLogger("splitserve.autoscaling")

POLICY_PATH = "splitserve.cluster.autoscaling.serve_policy:bottleneck_policy"
STATE_KEY = "splitserve_delay"
PUBLISHED_KEY = "splitserve_published"
PUBLISH_EVERY_S = 1.0  # decisions to the ledger, at most this often unless they change
SIGNAL_EVERY_S = 5.0  # the router's switch is re-asserted (a restarted router forgets it)


def series_from_context(raw: dict | None) -> PoolSeries:
    """Serve's {metric: {ReplicaID: [TimeStampedValue]}} as a PoolSeries."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name, per_replica in (raw or {}).items():
        out[name] = {getattr(rid, "unique_id", str(rid)): sorted(
            (float(p.timestamp), float(p.value)) for p in points)
            for rid, points in per_replica.items()}
    return out


def decision_record(app: str, kwargs: dict[str, Any], d: Decision, running: int, current: int,
                    lo: int, hi: int, now: float) -> DecisionRecord:
    """What the ledger keeps of one decision (shown by ``splitserve status``)."""
    return DecisionRecord(
        app=app, model=kwargs["model"], role=kwargs["role"],
        bottleneck=kwargs["spec"]["bottleneck"], time=now, running=running, current=current,
        target=d.target, desired=d.desired, value=d.bottleneck_value, reason=d.reason, min=lo,
        max=hi, changed=d.target != current, prefer_local_prefill=d.prefer_local_prefill)


def _publish(app: str, kwargs: dict[str, Any], d: Decision, record: DecisionRecord,
             published: dict[str, Any], now: float) -> dict[str, Any]:
    """Send the decision (and the network signal) when it changed or is due;
    returns the new ``published`` bookkeeping."""
    # a new running count goes out at once too: the ledger's history is the pool's size over time
    key = [d.target, d.desired, d.state.direction, record.running]
    out = dict(published)
    if key != published.get("key") or now - published.get("at", 0.0) >= PUBLISH_EVERY_S:
        if publish.record_decision(app, record):
            out.update(key=key, at=now)
        if record.changed:
            log.info("%s: %s", app, d.reason)
    if d.prefer_local_prefill is not None and (
            d.prefer_local_prefill != published.get("prefer_local")
            or now - published.get("signal_at", 0.0) >= SIGNAL_EVERY_S):
        if publish.set_prefer_local_prefill(d.prefer_local_prefill):
            out.update(prefer_local=d.prefer_local_prefill, signal_at=now)
    return out


def bottleneck_policy(ctx) -> tuple[int, dict[str, Any]]:
    """Serve custom policy: (target replicas, policy state)."""
    kwargs = ctx.config.policy.policy_kwargs
    spec = AutoscalingSpec(**kwargs["spec"])
    state = dict(ctx.policy_state or {})
    now = ctx.current_time or time.time()
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    current = ctx.target_num_replicas
    d = decide(series_from_context(ctx.raw_metrics), spec, current, lo, hi, now,
               DelayState.from_dict(state.get(STATE_KEY)), running=ctx.current_num_replicas)
    state[STATE_KEY] = d.state.to_dict()
    app = ctx.app_name or ctx.deployment_name
    record = decision_record(app, kwargs, d, ctx.current_num_replicas, current, lo, hi, now)
    try:
        record_autoscaler_decision(record)
    except Exception as e:  # noqa: BLE001 - metrics must never stop scaling
        log.warning("recording the decision of %s as metrics failed: %r", app, e)
    try:
        state[PUBLISHED_KEY] = _publish(app, kwargs, d, record, state.get(PUBLISHED_KEY, {}), now)
    except Exception as e:  # noqa: BLE001 - reporting must never stop scaling
        log.warning("publishing the decision of %s failed: %r", app, e)
    return d.target, state
