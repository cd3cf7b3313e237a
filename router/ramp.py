"""A canary ramp's decisions: plain Python over plain data, with the clock
passed in.

A ramp gives its new variant ``steps[0]`` percent of the route's traffic,
then each next step in turn. At every ``tick`` the controller judges the
current step from the outcomes observed since it began (``observe``): the
new variant's and, pooled, the other variants' (the baseline).

  judged      once the new variant has ``min_requests`` outcomes (and, for
              a guard relative to the baseline, the baseline has as many)
  breach      any judged guard fails: roll back (to the previous step, or
              to 0 percent with ``rollback: zero``) and stop: status
              ``rolled_back`` until the operator applies a changed route
  advance     the step has been held ``hold_s``, every guard is judged and
              holds: next step; reaching the last step completes the ramp
              (status ``complete``: the last step's weights stay)
  wait        otherwise (the hold time or the requests are missing)

Guards: the new variant's error rate at most ``max_error_rate``; at most
``max_error_rate_ratio`` times the baseline's (never less than
``error_rate_floor``, so one error against a clean baseline is no breach);
its TTFT and TPOT percentile at most ``max_ratio`` times the baseline's.
A breach is judged as soon as there are enough requests, before the hold
time: a bad canary is rolled back at once. Every move is a ``RampEvent``
with its time and reason; each move restarts the observations.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from splitserve.router.route_messages import MAX_EVENTS, LatencyGuard, RampEvent, RampPolicy, RampState

WINDOW_SAMPLES = 8192  # latency samples a window keeps per metric (the latest)
_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def percentile(samples: Iterable[float], name: str) -> float | None:
    """Nearest-rank percentile (``p50``, ``p90``, ``p99``); None without samples."""
    xs = sorted(samples)
    if not xs:
        return None
    rank = math.ceil(_QUANTILES[name] * len(xs))
    return xs[max(0, rank - 1)]


@dataclass
class Window:
    """Outcomes of one side (new variant or baseline) during one step."""

    requests: int = 0
    errors: int = 0
    ttft: deque = field(default_factory=lambda: deque(maxlen=WINDOW_SAMPLES))
    tpot: deque = field(default_factory=lambda: deque(maxlen=WINDOW_SAMPLES))

    def add(self, ok: bool, ttft_s: float, tpot_s: float) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        if ttft_s >= 0:
            self.ttft.append(ttft_s)
        if tpot_s >= 0:
            self.tpot.append(tpot_s)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class GuardReading:
    """One guard at one tick: its value, its bound, and whether it could be
    judged (``ok`` None: not enough observations yet)."""

    name: str
    value: float | None
    limit: float
    ok: bool | None

    def text(self) -> str:
        v = "-" if self.value is None else f"{self.value:.3g}"
        verdict = {None: "not judged", True: "ok", False: "BREACH"}[self.ok]
        return f"{self.name} {v} (max {self.limit:.3g}): {verdict}"


def _ratio(new: float | None, old: float | None) -> float | None:
    if new is None or old is None:
        return None
    if old <= 0:
        return math.inf if new > 0 else 1.0
    return new / old


def _latency(name: str, guard: LatencyGuard, samples_new: deque, samples_old: deque,
             enough: bool) -> GuardReading:
    ratio = _ratio(percentile(samples_new, guard.percentile),
                   percentile(samples_old, guard.percentile))
    judged = enough and ratio is not None
    return GuardReading(f"{name} {guard.percentile} ratio", ratio, guard.max_ratio,
                        None if not judged else ratio <= guard.max_ratio)


def read_guards(policy: RampPolicy, new: Window, old: Window) -> list[GuardReading]:
    """Every configured guard over the current step's windows."""
    enough_new = new.requests >= policy.min_requests
    enough_both = enough_new and old.requests >= policy.min_requests
    out = []
    rate = new.error_rate
    if policy.max_error_rate is not None:
        out.append(GuardReading("error rate", rate, policy.max_error_rate,
                                None if not enough_new else rate <= policy.max_error_rate))
    if policy.max_error_rate_ratio is not None:
        limit = policy.max_error_rate_ratio * max(old.error_rate or 0.0, policy.error_rate_floor)
        out.append(GuardReading("error rate vs baseline", rate, limit,
                                None if not enough_both else rate <= limit))
    if policy.ttft is not None:
        out.append(_latency("ttft", policy.ttft, new.ttft, old.ttft, enough_both))
    if policy.tpot is not None:
        out.append(_latency("tpot", policy.tpot, new.tpot, old.tpot, enough_both))
    return out


class RampController:
    """One route's ramp. ``observe`` every outcome, ``tick`` now and then;
    ``percent`` is the new variant's share in force."""

    def __init__(self, policy: RampPolicy, now: float, state: RampState | None = None):
        self.policy = policy
        if state is None or not -1 <= state.step < len(policy.steps):
            state = RampState(step=0, status="ramping", step_started_at=now)
            self._record(state, now, "start", 0.0, policy.steps[0],
                         f"ramp of {policy.variant} starts at {policy.steps[0]:g}%")
            if len(policy.steps) == 1:
                state.status = "complete"
        self.state = state
        self.new, self.old = Window(), Window()

    @property
    def percent(self) -> float:
        s = self.state.step
        return 0.0 if s < 0 else self.policy.steps[s]

    def observe(self, variant: str, ok: bool, ttft_s: float = -1.0, tpot_s: float = -1.0) -> None:
        (self.new if variant == self.policy.variant else self.old).add(ok, ttft_s, tpot_s)

    def readings(self) -> list[GuardReading]:
        return read_guards(self.policy, self.new, self.old)

    def tick(self, now: float) -> RampEvent | None:
        """Judge the current step; the move made (now in ``state.events``), or None."""
        st = self.state
        if st.status != "ramping":
            return None
        readings = self.readings()
        broken = [r for r in readings if r.ok is False]
        if broken:
            to = -1 if self.policy.rollback == "zero" else st.step - 1
            why = "; ".join(r.text() for r in broken)
            return self._move(now, to, "rollback", "rolled_back",
                              f"{why} over {self.new.requests} requests "
                              f"({self.old.requests} baseline)")
        held = now - st.step_started_at
        if held < self.policy.hold_s or self.new.requests < self.policy.min_requests:
            return None
        if any(r.ok is None for r in readings):
            return None
        last = st.step + 1 == len(self.policy.steps) - 1
        why = (f"held {held:.0f}s over {self.new.requests} requests "
               f"({self.old.requests} baseline)"
               + ("; " + "; ".join(r.text() for r in readings) if readings else ""))
        return self._move(now, st.step + 1, "complete" if last else "advance",
                          "complete" if last else "ramping", why)

    def _move(self, now: float, to: int, kind: str, status: str, reason: str) -> RampEvent:
        before = self.percent
        st = self.state
        st.step, st.status, st.step_started_at = to, status, now
        self.new, self.old = Window(), Window()
        return self._record(st, now, kind, before, self.percent, reason)

    @staticmethod
    def _record(state: RampState, now: float, kind: str, before: float, after: float,
                reason: str) -> RampEvent:
        ev = RampEvent(at=now, kind=kind, from_percent=before, to_percent=after, reason=reason)
        state.events.append(ev)
        del state.events[:-MAX_EVENTS]
        return ev
