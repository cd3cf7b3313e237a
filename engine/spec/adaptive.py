"""How many draft tokens to verify this step: the speculation length rule.

Verifying k drafts per sequence runs a batch of ``B * (k + 1)`` tokens
instead of ``B``. How much longer that step takes is the device's step
curve ``T(n)``, a step's time by its tokens (``StepCurve``). With
acceptance rate ``a`` (the chance that a draft token is accepted,
measured), a verify step yields on average ``E(k) = (1 - a^(k+1)) / (1 - a)``
tokens per sequence (accepted drafts plus the target's own next token), and
costs, relative to a plain decode step,

    C(k) = T(B (k + 1)) / T(B) + v + k r

with ``v`` the verify step's own work beyond its forward (the sampling
rounds of its drafts, the rollback), relative to a plain step, and ``r``
the measured time of one draft step relative to one target step;
a proposer whose drafting costs the same whatever ``k`` (prompt lookup: one
search finds the whole run, ``Proposer.cost_per_position`` False) is
charged ``r`` once, its time per step, not ``k r``. The engine verifies
the ``k`` in ``[0, num_speculative_tokens]`` with the largest
``E(k) / C(k)``; ``k = 0`` (no speculation) scores 1. So a small batch
speculates the full length, a batch large enough that verifying costs
more than it yields stops, and a low acceptance shortens the drafts first.
``disable_batch_size`` switches speculation off above a batch size
outright. When the rule turns speculation off on acceptance alone, one
step in ``PROBE_INTERVAL`` speculates the full length so the acceptance
rate is measured again (``LengthRule``, which the engine's decoder and the
planning simulator both run). Plain Python, no tensors.

Two curves: a knee (a GPU: the weights are read once per step whatever its
size, so the time stays flat up to ``saturation_tokens``, then grows in
proportion) and, on a CPU, ``fixed + sqrt(n) + linear n`` (a step's fixed
cost, then matrix products that get more efficient with their rows, never
flat, and in proportion once they are large). An operator's
``saturation_tokens`` sets a knee on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

@dataclass(frozen=True)
class StepCurve:
    """A step's time by its number of tokens ``n``, up to a constant factor:
    with ``saturation_tokens`` S > 0, ``max(1, n / S)`` (a knee), else
    ``fixed + sqrt(n) + linear * n``; ``verify``: what a verify step costs
    beyond its forward, in plain steps."""

    saturation_tokens: int = 0
    fixed: float = 0.0
    linear: float = 0.0
    verify: float = 0.0

    def time(self, n: float) -> float:
        if self.saturation_tokens > 0:
            return max(1.0, n / self.saturation_tokens)
        return self.fixed + math.sqrt(n) + self.linear * n


# The curve when the operator sets no ``saturation_tokens``, by device type.
# A GPU reads the weights once per decode step and leaves most of its
# arithmetic idle: a 7-8B model's step time stays flat to a few hundred
# tokens. A CPU has no such flat stretch, but its matrix products get more
# efficient with their rows: measured with the default model on a 2-vCPU
# Xeon, one thread (``bench_spec --step-costs``, docs/benchmarks.md), a
# verify forward against a plain one follows ``5.3 + sqrt(n) + 0.058 n``
# within 11% over batches of 1 to 32 sequences with 1 to 12 drafts each
# (one sequence with 4 drafts 1.26, model 1.23; eight with 4 each 1.48,
# model 1.62; 32 with 4 each 2.08, model 2.13; 32 with 12 each 4.32, model
# 3.89), where a knee at 8 tokens put eight sequences with 4 drafts each at
# 5.0 and 32 with 4 each at 5.0. Whole verify steps cost more on a CPU than
# their forwards: the drafts' sampling rounds and the rollback run in
# Python per sequence. End to end (bench_spec, fixed lengths, 8 and 32
# sequences) that was 0.45-0.8 of a plain step more than the forward alone;
# ``verify`` 0.5 keeps prompt lookup off on free text there (0.84-0.88x
# when the forward alone was counted) and on where the output copies the
# prompt. On GPUs it is left at 0: unmeasured.
STEP_CURVES = {"cuda": StepCurve(saturation_tokens=256),
               "cpu": StepCurve(fixed=5.3, linear=0.058, verify=0.5)}


def default_step_curve(device_type: str) -> StepCurve:
    """The step curve on ``device_type`` ("cuda", "cpu", ...); other
    accelerators are taken to be GPU-like."""
    return STEP_CURVES.get(device_type, STEP_CURVES["cuda"])


def step_curve(saturation_tokens: int | None, device_type: str) -> StepCurve:
    """The operator's knee where one is set, else the device's curve."""
    if saturation_tokens:
        return StepCurve(saturation_tokens=int(saturation_tokens))
    return default_step_curve(device_type)


def as_curve(curve: StepCurve | int) -> StepCurve:
    """A curve, or a knee at that many tokens."""
    return curve if isinstance(curve, StepCurve) else StepCurve(saturation_tokens=int(curve))


# steps without speculation, chosen by the adaptive rule, before one that
# speculates the full length to measure the acceptance rate again
PROBE_INTERVAL = 32


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify step yields per sequence with ``k`` drafts."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def step_cost(batch: int, k: int, curve: StepCurve | int, draft_ratio: float,
              per_position: bool = True) -> float:
    """A verify step's time relative to a plain decode step of ``batch`` on
    ``curve`` (an int: a knee at that many tokens; ``per_position``: the
    draft's cost grows with ``k``)."""
    c = as_curve(curve)
    draft = k * draft_ratio if per_position else draft_ratio
    return c.time(batch * (k + 1)) / c.time(batch) + c.verify + draft


def choose_num_tokens(max_k: int, batch: int, alpha: float, curve: StepCurve | int,
                      draft_ratio: float = 0.0, disable_batch_size: int | None = None,
                      per_position: bool = True) -> int:
    """The speculation length for this step (0: do not speculate);
    ``curve`` and ``per_position`` as in ``step_cost``."""
    if batch <= 0 or (disable_batch_size is not None and batch > disable_batch_size):
        return 0
    best_k, best = 0, 1.0
    for k in range(1, max_k + 1):
        score = expected_tokens(alpha, k) / step_cost(batch, k, curve, draft_ratio, per_position)
        if score > best + 1e-9:
            best_k, best = k, score
    return best_k


class AcceptanceTracker:
    """Moving averages of the acceptance rate and of the draft cost ratio,
    updated after each verify step.

    The acceptance rate is the chance that a draft token is accepted when
    the ones before it were: accepted tokens over the draft tokens the
    verification reached (the accepted ones, and the first rejected one of
    each run cut short; the drafts after it were never judged). That is
    the rate ``expected_tokens`` takes, whatever length was verified: a
    share of all drafted tokens would read lower the longer the drafts.

    The cost ratio starts at ``cost_prior``, which counts as one
    observation: while few steps are timed it is their running mean with
    the prior, then an exponential moving average (``weight``). One step
    never sets it outright: a single slow step (the machine stalling, a
    draft that still had one-off work in it) would otherwise decide
    speculation off, and with speculation off only the rare probe steps
    are timed to bring it back."""

    def __init__(self, prior: float = 0.5, weight: float = 0.1, cost_prior: float = 0.0,
                 acceptance_weight: float = 0.05):
        self.alpha = prior
        self.draft_ratio = cost_prior
        self.weight = weight
        self.acceptance_weight = acceptance_weight  # per judged draft token
        self._timed = 0  # steps whose draft cost was observed

    def observe(self, proposed: int, accepted: int, draft_s: float | None, step_s: float,
                rejected: int) -> None:
        """``proposed`` draft tokens verified this step, ``accepted`` of
        them, ``rejected``: the runs that a rejected draft cut short (a
        sequence that finished on an accepted token was not);
        ``draft_s``: seconds per draft position of this step's drafting
        (per step for a proposer whose cost does not grow with the length),
        without one-off work (None: not measured this step); ``step_s``:
        the verify step without the drafting."""
        reached = accepted + rejected
        if proposed > 0 and reached > 0:
            # a step with more judged drafts says more, but no one step decides alone
            w = min(0.2, self.acceptance_weight * reached)
            self.alpha += w * (accepted / reached - self.alpha)
        if draft_s is not None and step_s > 0:
            self._timed += 1
            w = max(self.weight, 1.0 / (self._timed + 1))
            self.draft_ratio += w * (draft_s / step_s - self.draft_ratio)


class LengthRule:
    """The speculation length of each step: ``disable_batch_size``, then the
    adaptive rule over ``tracker`` (or always ``max_k`` when not adaptive),
    with a probe. When the rule turns speculation off on measured
    acceptance alone, one step in ``PROBE_INTERVAL`` with sequences to
    draft for speculates the full length, or a better-suited workload would
    never be seen. When even every draft accepted would not pay at this
    batch size (the verify step's cost, the draft's), measuring acceptance
    changes nothing, so it does not probe: each probe costs a verify step
    of ``batch * (k + 1)`` tokens, and a draft model's catch-up on every
    sequence."""

    def __init__(self, max_k: int, curve: StepCurve | int, adaptive: bool = True,
                 disable_batch_size: int | None = None,
                 tracker: AcceptanceTracker | None = None, per_position: bool = True):
        self.max_k = max_k
        self.per_position = per_position  # the draft's cost: Proposer.cost_per_position
        self.curve = as_curve(curve)
        self.adaptive = adaptive
        self.disable_batch_size = disable_batch_size
        self.tracker = tracker if tracker is not None else AcceptanceTracker()
        self.idle_steps = 0  # steps the adaptive rule chose not to speculate

    def length(self, batch: int, any_candidate: bool) -> int:
        """This step's speculation length for a running batch of ``batch``
        sequences (``any_candidate``: some of them may be drafted for)."""
        if self.disable_batch_size is not None and batch > self.disable_batch_size:
            return 0
        if not self.adaptive:
            return self.max_k
        max_k, t = self.max_k, self.tracker
        k = choose_num_tokens(max_k, batch, t.alpha, self.curve, t.draft_ratio,
                              per_position=self.per_position)
        if k > 0:
            self.idle_steps = 0
            return k
        if choose_num_tokens(max_k, batch, 1.0, self.curve, t.draft_ratio,
                             per_position=self.per_position) == 0:
            return 0  # off on cost: no acceptance would pay
        self.idle_steps += 1
        if self.idle_steps >= PROBE_INTERVAL and any_candidate:
            self.idle_steps = 0
            return max_k
        return 0

    def quiet(self, batch: int) -> bool:
        """Whether ``length(batch, ...)`` is 0 and changes no state, whatever
        the acceptance: speculation is off by batch size or on cost. Steps
        at such a batch size are plain decode steps (a simulator may run
        them as one)."""
        if self.disable_batch_size is not None and batch > self.disable_batch_size:
            return True
        if not self.adaptive:
            return False
        return choose_num_tokens(self.max_k, batch, 1.0, self.curve,
                                 self.tracker.draft_ratio, per_position=self.per_position) == 0
