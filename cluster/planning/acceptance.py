"""Speculative decoding's acceptance for planning: which rate to assume, from
where, and the speculation length the engine's rule settles on with it.

The planner's estimate and the simulator model a verify step the same way:
each of its ``k`` drafts is accepted with a per-token rate ``a`` while the
ones before it were, so a step yields ``adaptive.expected_tokens(a, k)``
tokens per sequence. ``per_token_rate`` fits ``a`` to what an engine run
measured (output tokens per decoding sequence and step at a fixed ``k``);
``resolve`` picks the rate for a (model, method, workload) from the
profile database's ``speculation`` rows, else ``ASSUMED_ACCEPTANCE``, and
says which (``Acceptance.describe``).

``settled_length`` is the length ``engine.spec.adaptive.LengthRule``
settles on at a batch size when drafts are accepted at ``a``: the rule
scores lengths by its tracker's rate, which the engine measures as
accepted over judged drafts (``AcceptanceTracker``), ``a`` itself. The
estimate tabulates it per batch size (``length_table``), by the engine's
``choose_num_tokens`` on the device's step curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitserve.cluster.planning.records import SpecAcceptance
from splitserve.engine.spec.adaptive import (
    StepCurve, choose_num_tokens, expected_tokens, step_curve)

# assumed per-token acceptance rate of the drafts, by method, where the
# profile database has no measured row
ASSUMED_ACCEPTANCE = {"ngram": 0.7, "draft": 0.7}
MEASURED_SOURCE, ASSUMED_SOURCE = "measured", "assumed"


def per_token_rate(tokens_per_step: float, k: float) -> float:
    """The per-token rate ``a`` with ``expected_tokens(a, k) ==
    tokens_per_step`` (bisection; ``expected_tokens`` rises with ``a``).
    One token per step or fewer is 0, ``k + 1`` or more is 1."""
    if tokens_per_step <= 1.0:
        return 0.0
    if tokens_per_step >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens(mid, k) < tokens_per_step:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Acceptance:
    """The rate a plan assumes for one speculation method, and where it came from."""

    method: str
    rate: float
    source: str  # measured | assumed | given (an option's value)
    workload: str = ""  # the measured row's workload
    detail: str = ""  # which rows, for the report

    def describe(self) -> str:
        if self.source == ASSUMED_SOURCE:
            return f"assumed {self.rate:.2f} (no measured {self.method} row)"
        if self.source == MEASURED_SOURCE:
            return f"measured {self.rate:.2f} (profile: {self.detail})"
        return f"{self.source} {self.rate:.2f}"

    def to_dict(self) -> dict:
        return {"method": self.method, "rate": self.rate, "source": self.source,
                "workload": self.workload, "detail": self.detail}


def resolve(db, model_key: str, method: str, workload: str | None = None,
            draft: str | None = None) -> Acceptance:
    """The acceptance of ``method`` for a model (key, name, or a model of the
    same structure), with the draft model ``draft`` (its key) when given:
    the best measured row of ``workload`` when one is given and measured;
    else the most conservative (lowest) rate measured on any workload, since
    the plan's text is not known to resemble any of them; else
    ``ASSUMED_ACCEPTANCE``."""
    rows = [r for r in db.speculation(model_key, method) if r.provenance == "measured"
            and (draft is None or r.draft == draft)]
    if workload is not None:
        match = [r for r in rows if r.workload == workload]
        if match:
            return _measured(method, match[0], f"{workload}, k={match[0].k}")
    if rows:
        # the newest row of each workload, then the lowest of those
        newest: dict[str, SpecAcceptance] = {}
        for r in rows:
            newest.setdefault(r.workload, r)
        low = min(newest.values(), key=lambda r: r.acceptance)
        names = ", ".join(sorted(newest))
        why = (f"{low.workload}, k={low.k}; the lowest of {len(newest)} workloads ({names})"
               if len(newest) > 1 else f"{low.workload}, k={low.k}")
        if workload is not None:
            why += f"; none measured on {workload}"
        return _measured(method, low, why)
    return Acceptance(method, ASSUMED_ACCEPTANCE[method], ASSUMED_SOURCE)


def _measured(method: str, row: SpecAcceptance, why: str) -> Acceptance:
    return Acceptance(method, row.acceptance, MEASURED_SOURCE, row.workload,
                      f"{why}, {row.draft_tokens} drafted tokens")


def settled_length(max_k: int, batch: int, a: float, curve: StepCurve | int,
                   draft_ratio: float = 0.0, disable_batch_size: int | None = None) -> int:
    """The speculation length ``LengthRule`` (adaptive) settles on for a
    steady batch of ``batch`` when drafts are accepted at ``a``: its
    tracker measures the rate itself (accepted over judged drafts), at
    whatever length it verifies or probes, so it settles where the rule's
    choice at ``a`` is; 0 where that is no speculation (only its rare
    probes draft)."""
    return choose_num_tokens(max_k, batch, a, curve, draft_ratio, disable_batch_size)


@dataclass(frozen=True)
class LengthTable:
    """Per batch size 0..len-1: the settled length ``k`` and the tokens a
    sequence gets per step (``expected_tokens(a, k)``; 1 without drafts)."""

    k: np.ndarray
    tokens: np.ndarray


def length_table(max_k: int, a: float, device_type: str, max_batch: int,
                 draft_ratio: float = 0.0, saturation_tokens: int | None = None) -> LengthTable:
    curve = step_curve(saturation_tokens, device_type)
    ks = np.array([settled_length(max_k, b, a, curve, draft_ratio) for b in range(max_batch + 1)],
                  dtype=np.int64)
    toks = np.array([expected_tokens(a, int(k)) for k in ks])
    return LengthTable(ks, toks)
