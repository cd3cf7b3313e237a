"""How many replicas a pool should have, from its bottleneck's metrics.

Pure: plain data in, a ``Decision`` out, no Ray. The Serve policy
(``serve_policy``) calls ``decide`` on every control-loop tick with the
replicas' recent metric series and the state returned by the previous call.

Each bottleneck reduces the pool's metrics to one *value*: load relative to
its target, 1.0 meaning exactly on target. The desired replica count is the
current number of reporting replicas times that value (rounded up), clamped
to the bounds. A change happens only after the desire has held without
interruption for ``upscale_delay_s`` / ``downscale_delay_s``, and not within
``cooldown_s`` of the previous change.

- compute: predicted queueing delay (pending prompt tokens / measured prefill
  tokens per busy second) vs ``target_ttft_s``; busy fraction of the engine
  loop and GPU utilization vs ``target_busy_fraction``.
- memory: KV block usage vs ``target_kv_usage``; running / max sequences vs
  ``target_seq_fraction``; decode step time vs ``target_tpot_s`` when set.
- network: hand-off bytes/s per replica vs ``link_bytes_per_s *
  target_link_utilization``; above target the router should prefer local
  prefill (``Decision.prefer_local_prefill``).
- requests: queue length alone, running + waiting requests per replica vs
  ``target_ongoing_requests`` (Ray Serve's default policy, blind to what a
  request costs: a long prompt and a one-token chat count the same).
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from splitserve.cluster.autoscaling import signals as m
from splitserve.cluster.config import AutoscalingSpec

# metric name -> replica id -> [(timestamp, value)], oldest first
PoolSeries = Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]


@dataclass(frozen=True)
class DelayState:
    """What ``decide`` remembers between calls."""

    direction: int = 0  # +1: wanting more replicas, -1: fewer, 0: neither
    since: float | None = None  # when the current desire started
    last_change: float | None = None  # when the target last changed
    prefer_local: bool = False  # network: the router is told to prefer local prefill
    calm_since: float | None = None  # network: hand-offs within target since then

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return {"direction": self.direction, "since": self.since, "last_change": self.last_change,
                "prefer_local": self.prefer_local, "calm_since": self.calm_since}

    @classmethod
    def from_dict(cls, d: Mapping[str, float | int | bool | None] | None) -> "DelayState":
        if not d:
            return cls()
        return cls(int(d.get("direction") or 0), d.get("since"), d.get("last_change"),
                   bool(d.get("prefer_local", False)), d.get("calm_since"))


@dataclass(frozen=True)
class Decision:
    target: int  # replicas the pool should have now
    reason: str  # one line, for logs and `splitserve status`
    bottleneck_value: float | None  # load / target; None without metrics
    desired: int  # what the load alone asks for, before delays (clamped)
    state: DelayState
    prefer_local_prefill: bool | None = None  # network bottleneck only


@dataclass(frozen=True)
class Load:
    """A pool's bottleneck reduced to one value, and why."""

    value: float
    why: str
    prefer_local_prefill: bool | None = None


# -- reading the series ----------------------------------------------------------
def _window(points: Sequence[tuple[float, float]], now: float, look_back_s: float):
    return [(t, v) for t, v in points if now - look_back_s <= t <= now]


def _per_replica(series: PoolSeries, name: str, now: float, look_back_s: float):
    out = {}
    for rid, pts in series.get(name, {}).items():
        w = _window(pts, now, look_back_s)
        if w:
            out[rid] = w
    return out


def reporting_replicas(series: PoolSeries, now: float, look_back_s: float) -> set[str]:
    """Replicas with at least one sample of any metric in the window."""
    return {rid for name in series for rid in _per_replica(series, name, now, look_back_s)}


def gauge_means(series: PoolSeries, name: str, now: float, look_back_s: float) -> dict[str, float]:
    """replica -> mean of the gauge over the window."""
    return {rid: sum(v for _, v in w) / len(w)
            for rid, w in _per_replica(series, name, now, look_back_s).items()}


def counter_deltas(series: PoolSeries, name: str, now: float,
                   look_back_s: float) -> dict[str, tuple[float, float, float]]:
    """replica -> (increase, seconds covered, last value) of a cumulative
    counter over the window; replicas with fewer than two samples are left out."""
    out = {}
    for rid, w in _per_replica(series, name, now, look_back_s).items():
        if len(w) >= 2 and w[-1][0] > w[0][0]:
            out[rid] = (max(0.0, w[-1][1] - w[0][1]), w[-1][0] - w[0][0], w[-1][1])
    return out


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


# -- one value per bottleneck -----------------------------------------------------
def compute_load(series: PoolSeries, spec: AutoscalingSpec, now: float) -> Load | None:
    lb = spec.look_back_s
    pending = gauge_means(series, m.PENDING_PROMPT_TOKENS, now, lb)
    busy = counter_deltas(series, m.BUSY_TIME_S, now, lb)
    computed = counter_deltas(series, m.PROMPT_TOKENS_COMPUTED, now, lb)
    parts: list[tuple[float, str]] = []
    # tokens per busy second: over the window when the replica worked in it,
    # else over its lifetime (the counters are cumulative)
    tput = 0.0
    for rid, (d_busy, _, busy_total) in busy.items():
        d_tok, _, tok_total = computed.get(rid, (0.0, 0.0, 0.0))
        if d_busy > 0 and d_tok > 0:
            tput += d_tok / d_busy
        elif busy_total > 0 and tok_total > 0:
            tput += tok_total / busy_total
    total_pending = sum(pending.values())
    if pending and tput > 0:
        delay = total_pending / tput
        parts.append((delay / spec.target_ttft_s,
                      f"predicted queueing delay {delay:.3f}s vs target {spec.target_ttft_s:g}s "
                      f"({total_pending:.0f} pending prompt tokens at {tput:.0f} tokens/s)"))
    frac = _mean(d / dt for d, dt, _ in busy.values())
    if frac is not None:
        parts.append((frac / spec.target_busy_fraction,
                      f"busy {frac:.0%} vs target {spec.target_busy_fraction:.0%}"))
    parts += _gauge_part(series, m.GPU_UTILIZATION, now, lb, spec.target_busy_fraction,
                         "GPU utilization {:.0%}")
    return _dominant(parts)


def _gauge_part(series: PoolSeries, metric: str, now: float, look_back_s: float,
                target: float, what: str) -> list[tuple[float, str]]:
    """A gauge averaged over the pool's replicas as (load, why) against its
    target fraction; none while no replica reports it. ``what`` formats the value."""
    value = _mean(gauge_means(series, metric, now, look_back_s).values())
    if value is None:
        return []
    return [(value / target, f"{what.format(value)} vs target {target:.0%}")]


def memory_load(series: PoolSeries, spec: AutoscalingSpec, now: float) -> Load | None:
    lb = spec.look_back_s
    parts: list[tuple[float, str]] = []
    parts += _gauge_part(series, m.KV_USED_FRACTION, now, lb, spec.target_kv_usage,
                         "KV usage {:.0%}")
    parts += _gauge_part(series, m.SEQ_FRACTION, now, lb, spec.target_seq_fraction,
                         "running sequences {:.0%} of max")
    if spec.target_tpot_s is not None:
        busy = counter_deltas(series, m.BUSY_TIME_S, now, lb)
        steps = counter_deltas(series, m.DECODE_STEPS, now, lb)
        tpot = _mean(busy[r][0] / steps[r][0] for r in busy if r in steps and steps[r][0] > 0)
        if tpot is not None:
            parts.append((tpot / spec.target_tpot_s,
                          f"time per output token {tpot * 1e3:.1f}ms vs target "
                          f"{spec.target_tpot_s * 1e3:.1f}ms"))
    return _dominant(parts)


def network_load(series: PoolSeries, spec: AutoscalingSpec, now: float) -> Load | None:
    rates = counter_deltas(series, m.HANDOFF_BYTES, now, spec.look_back_s)
    rate = _mean(d / dt for d, dt, _ in rates.values())
    if rate is None:
        return None
    budget = spec.link_bytes_per_s * spec.target_link_utilization
    value = rate / budget
    return Load(value, f"hand-off {rate / 1e6:.1f} MB/s per replica vs target "
                       f"{budget / 1e6:.1f} MB/s ({spec.target_link_utilization:.0%} of link)",
                prefer_local_prefill=value > 1.0)


def requests_load(series: PoolSeries, spec: AutoscalingSpec, now: float) -> Load | None:
    """Ongoing requests (running + waiting, each averaged over the window)
    per replica against ``target_ongoing_requests``; the desired count is
    then ceil(total ongoing / target), as Ray Serve computes it."""
    lb = spec.look_back_s
    running = gauge_means(series, m.RUNNING, now, lb)
    waiting = gauge_means(series, m.WAITING, now, lb)
    per = [running.get(r, 0.0) + waiting.get(r, 0.0) for r in set(running) | set(waiting)]
    if not per:
        return None
    ongoing = sum(per) / len(per)
    target = spec.target_ongoing_requests
    return Load(ongoing / target, f"{ongoing:.1f} ongoing requests per replica vs target "
                                  f"{target:g}")


def _dominant(parts: list[tuple[float, str]]) -> Load | None:
    if not parts:
        return None
    value, why = max(parts, key=lambda p: p[0])
    return Load(value, why)


LOADS = {"compute": compute_load, "memory": memory_load, "network": network_load,
         "requests": requests_load}


# -- the decision --------------------------------------------------------------
# A pool shrinks only to a size where its load stays at most this share of
# target, so a steady load near the target does not flap the pool.
DOWNSCALE_HEADROOM = 0.9


def desired_replicas(n_reporting: int, value: float, current: int) -> int:
    """Replicas that bring ``value`` to 1.0 if load spreads evenly; fewer than
    ``current`` only when the load then stays within the headroom."""
    up = math.ceil(n_reporting * value - 1e-9)
    if up >= current:
        return up
    return min(current, max(0, math.ceil(n_reporting * value / DOWNSCALE_HEADROOM - 1e-9)))


def local_prefill_signal(load: Load, spec: AutoscalingSpec, now: float,
                         state: DelayState) -> tuple[bool | None, DelayState]:
    """Whether the router should prefer local prefill. On as soon as hand-offs
    exceed their target; off only after they stayed within it for
    ``downscale_delay_s`` (local prefill itself lowers the hand-off traffic,
    so switching off at once would make the signal oscillate)."""
    if load.prefer_local_prefill is None:
        return None, state
    if load.prefer_local_prefill:
        return True, replace(state, prefer_local=True, calm_since=None)
    if not state.prefer_local:
        return False, state
    calm = now if state.calm_since is None else state.calm_since
    if now - calm + 1e-9 >= spec.downscale_delay_s:
        return False, replace(state, prefer_local=False, calm_since=None)
    return True, replace(state, calm_since=calm)


def _clamp(x: int, lo: int, hi: int) -> int:
    return lo if x < lo else hi if x > hi else x


def decide(pool_metrics_series: PoolSeries, spec: AutoscalingSpec, current: int, min: int,
           max: int, now: float, state: DelayState | None = None,
           running: int | None = None) -> Decision:
    """The pool's target replica count. ``current`` is the present target,
    ``min``/``max`` the bounds (named as Serve names them), ``now`` a time on
    the samples' clock (wall-clock seconds), ``running`` how many replicas
    run (fewer than ``current`` while new ones start; None: all of them)."""
    lo, hi = min, max
    state = state or DelayState()
    if current < lo or current > hi:
        target = lo if current < lo else hi
        return Decision(target, f"bounds are now [{lo}, {hi}]: {current} -> {target}", None,
                        target, replace(state, direction=0, since=None, last_change=now))
    n = len(reporting_replicas(pool_metrics_series, now, spec.look_back_s))
    load = LOADS[spec.bottleneck](pool_metrics_series, spec, now) if n else None
    if load is None:
        why = (f"no metrics from the replicas in the last {spec.look_back_s:g}s" if not n
               else f"no {spec.bottleneck} metrics yet")
        return Decision(current, f"hold at {current}: {why}", None, current,
                        replace(state, direction=0, since=None))
    prefer_local, state = local_prefill_signal(load, spec, now, state)
    desired = _clamp(desired_replicas(n, load.value, current), lo, hi)
    starting = 0 if running is None else builtins.max(0, current - running)
    value = round(load.value, 4)

    def done(target: int, reason: str, st: DelayState) -> Decision:
        st = replace(st, prefer_local=state.prefer_local, calm_since=state.calm_since)
        return Decision(target, reason, value, desired, st, prefer_local)

    if desired == current:
        edge = " (at max_replicas)" if current == hi and load.value > 1 else ""
        return done(current, f"hold at {current}{edge}: {load.why}",
                    replace(state, direction=0, since=None))
    up = desired > current
    if not up and starting:
        # the load of replicas not serving yet says nothing about the pool's size
        return done(current, f"hold at {current}: {starting} replica(s) still starting; "
                             f"{load.why}", replace(state, direction=0, since=None))
    direction = 1 if up else -1
    since = state.since if state.direction == direction and state.since is not None else now
    st = replace(state, direction=direction, since=since)
    delay = spec.upscale_delay_s if up else spec.downscale_delay_s
    verb = "scale up" if up else "scale down"
    held = now - since
    if held + 1e-9 < delay:
        return done(current, f"{verb} to {desired} in {delay - held:.1f}s if it persists: "
                             f"{load.why}", st)
    if state.last_change is not None and now - state.last_change + 1e-9 < spec.cooldown_s:
        left = spec.cooldown_s - (now - state.last_change)
        return done(current, f"{verb} to {desired} after {left:.1f}s cooldown: {load.why}", st)
    return done(desired, f"{verb} {current} -> {desired}: {load.why}",
                DelayState(last_change=now))
