"""RouteBook: every route's weights in force and every ramp's controller;
the route controller actor (``splitserve.cluster.serve.route_actor``) wraps
one, persists its ``state()`` and ticks it.

``apply`` installs the operator's routes: a route whose policy is unchanged
keeps its ramp where it stands; a new or changed one starts afresh (its
configured weights, or its ramp's first step). ``record`` feeds the
ingresses' per-request outcomes to the ramps, ``tick`` lets each ramp move,
and ``table`` is what the ingresses pick from; its ``version`` changes
whenever a weight does. Synchronous and deterministic given the clock.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

from splitserve.router.ramp import RampController
from splitserve.router.route_messages import (
    BookState,
    RampEvent,
    RoutePolicy,
    RouteTable,
    RouteWeights,
    VariantOutcome,
)
from splitserve.router.traffic import split_percent


class RouteBook:
    def __init__(self, clock: Callable[[], float] = time.time, state: BookState | None = None):
        self._clock = clock
        self.version = 0
        self.policies: dict[str, RoutePolicy] = {}
        self.ramps: dict[str, RampController] = {}
        self._table: RouteTable | None = None
        if state is not None:
            self._load(state)

    # -- the operator's routes ------------------------------------------------------
    def apply(self, policies: Sequence[RoutePolicy]) -> list[str]:
        """Install ``policies`` (the operator file's routes, all of them).
        Returns what happened, one line per route added, changed or removed."""
        now = self._clock()
        lines = []
        new = {p.name: p for p in policies}
        for name in sorted(self.policies.keys() - new.keys()):
            lines.append(f"route {name}: removed")
        ramps: dict[str, RampController] = {}
        for name, p in new.items():
            old = self.policies.get(name)
            if old == p:
                if name in self.ramps:
                    ramps[name] = self.ramps[name]
                continue
            lines.append(f"route {name}: {'changed' if old is not None else 'added'}")
            if p.ramp is not None:
                ramps[name] = RampController(p.ramp, now)
        self.policies, self.ramps = new, ramps
        if lines:
            self._changed()
        return lines

    def _load(self, state: BookState) -> None:
        now = self._clock()
        self.version = state.version
        self.policies = {p.name: p for p in state.policies}
        self.ramps = {name: RampController(p.ramp, now, state.ramps.get(name))
                      for name, p in self.policies.items() if p.ramp is not None}
        self._table = None

    def state(self) -> BookState:
        """What to persist: a RouteBook built with it resumes every ramp at
        its step (the step's observations start over)."""
        return BookState(version=self.version, policies=tuple(self.policies.values()),
                         ramps={n: c.state for n, c in self.ramps.items()})

    # -- outcomes and moves -----------------------------------------------------------
    def record(self, outcomes: Iterable[VariantOutcome]) -> None:
        for o in outcomes:
            c = self.ramps.get(o.route)
            p = self.policies.get(o.route)
            if c is not None and p is not None and o.variant in p.variants:
                c.observe(o.variant, o.ok, o.ttft_s, o.tpot_s)

    def tick(self) -> list[tuple[str, RampEvent]]:
        """Let every ramp judge its step; the moves made, by route."""
        now = self._clock()
        moves = []
        for name, c in self.ramps.items():
            ev = c.tick(now)
            if ev is not None:
                moves.append((name, ev))
        if moves:
            self._changed()
        return moves

    def _changed(self) -> None:
        self.version += 1
        self._table = None

    # -- what the ingresses and the operators see ---------------------------------------
    def weights(self, name: str) -> tuple[float, ...]:
        p = self.policies[name]
        c = self.ramps.get(name)
        if c is None:
            return tuple(float(w) for w in p.weights)
        return split_percent(p.variants, p.weights, c.policy.variant, c.percent)

    def table(self) -> RouteTable:
        if self._table is None:
            self._table = RouteTable(self.version, tuple(
                RouteWeights(p.name, p.variants, self.weights(p.name), p.key_header, p.sticky)
                for p in self.policies.values()))
        return self._table

    def status(self) -> list[dict[str, Any]]:
        """One dict per route: variants with their weights in force (percent
        of the route's traffic), the ramp's step, guard readings and its
        last move."""
        out = []
        for name, p in self.policies.items():
            w = self.weights(name)
            total = sum(w) or 1.0
            row: dict[str, Any] = {
                "route": name,
                "variants": [{"name": v, "weight": x, "percent": 100.0 * x / total}
                             for v, x in zip(p.variants, w)],
                "ramp": None}
            c = self.ramps.get(name)
            if c is not None:
                st = c.state
                last = st.events[-1] if st.events else None
                row["ramp"] = {
                    "variant": c.policy.variant, "status": st.status, "step": st.step,
                    "steps": list(c.policy.steps), "percent": c.percent,
                    "step_started_at": st.step_started_at,
                    "requests": {"new": c.new.requests, "baseline": c.old.requests},
                    "guards": [{"name": r.name, "value": r.value, "limit": r.limit, "ok": r.ok}
                               for r in c.readings()],
                    "last_move": None if last is None else {
                        "at": last.at, "kind": last.kind, "from_percent": last.from_percent,
                        "to_percent": last.to_percent, "reason": last.reason},
                }
            out.append(row)
        return out
