"""How many draft tokens to verify this step: the speculation length rule.

Verifying k drafts per sequence runs a batch of ``B * (k + 1)`` tokens
instead of ``B``. Decode steps are memory-bound (the weights are read once
per step whatever its size) until the batch reaches ``saturation_tokens``;
past that, a step's time grows with its tokens. With acceptance rate ``a``
(the chance that a draft token is accepted, measured), a verify step
yields on average ``E(k) = (1 - a^(k+1)) / (1 - a)`` tokens per sequence
(accepted drafts plus the target's own next token), and costs, relative to
a plain decode step,

    C(k) = max(1, B (k + 1) / S) / max(1, B / S) + k r

with ``S = saturation_tokens`` and ``r`` the measured time of one draft
step relative to one target step; a proposer whose drafting costs the same
whatever ``k`` (prompt lookup: one search finds the whole run,
``Proposer.cost_per_position`` False) is charged ``r`` once, its time per
step, not ``k r``. The engine
verifies the ``k`` in ``[0, num_speculative_tokens]`` with the largest
``E(k) / C(k)``; ``k = 0`` (no speculation) scores 1. So a small batch
speculates the full length, a batch large enough that verifying costs
more than it yields stops, and a low acceptance shortens the drafts first.
``disable_batch_size`` switches speculation off above a batch size
outright. When the rule turns speculation off on acceptance alone, one
step in ``PROBE_INTERVAL`` speculates the full length so the acceptance
rate is measured again (``LengthRule``, which the engine's decoder and the
planning simulator both run). Plain Python, no tensors.
"""

from __future__ import annotations

# ``saturation_tokens`` when the operator leaves it unset, by device type.
# A GPU reads the weights once per decode step and leaves most of its
# arithmetic idle: a 7-8B model's step time stays flat to a few hundred
# tokens. A CPU has little such slack: its matrix products take time in
# proportion to their rows past a few tokens. Measured with the default
# model on a 2-vCPU Xeon, one thread (``bench_spec --step-costs``,
# docs/benchmarks.md), a verify forward against a plain one: one sequence
# with 4 drafts 1.26, with 6 1.36, with 8 1.42; two sequences with 4 each
# 1.37; eight sequences with one each 1.18, with 4 each 1.48. At 8 a batch
# of one verifies up to 7 drafts as if free (each costs a twentieth of a
# step or so: a run accepted whole pays that many times over), batches of 2
# to 7 verify fewer (at acceptance 0.6: 3 drafts at 2, 2 at 3, 1 at 4-6,
# none at 7), and from 8 on one draft would cost as much as it could ever
# yield: no speculation there.
SATURATION_TOKENS = {"cuda": 256, "cpu": 8}

# steps without speculation, chosen by the adaptive rule, before one that
# speculates the full length to measure the acceptance rate again
PROBE_INTERVAL = 32


def default_saturation_tokens(device_type: str) -> int:
    """The knee of the step time on ``device_type`` ("cuda", "cpu", ...);
    other accelerators are taken to be GPU-like."""
    return SATURATION_TOKENS.get(device_type, SATURATION_TOKENS["cuda"])


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify step yields per sequence with ``k`` drafts."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def step_cost(batch: int, k: int, saturation_tokens: int, draft_ratio: float,
              per_position: bool = True) -> float:
    """A verify step's time relative to a plain decode step of ``batch``
    (``per_position``: the draft's cost grows with ``k``)."""
    s = float(saturation_tokens)
    draft = k * draft_ratio if per_position else draft_ratio
    return max(1.0, batch * (k + 1) / s) / max(1.0, batch / s) + draft


def choose_num_tokens(max_k: int, batch: int, alpha: float, saturation_tokens: int,
                      draft_ratio: float = 0.0, disable_batch_size: int | None = None,
                      per_position: bool = True) -> int:
    """The speculation length for this step (0: do not speculate);
    ``per_position`` as in ``step_cost``."""
    if batch <= 0 or (disable_batch_size is not None and batch > disable_batch_size):
        return 0
    best_k, best = 0, 1.0
    for k in range(1, max_k + 1):
        score = expected_tokens(alpha, k) / step_cost(batch, k, saturation_tokens, draft_ratio,
                                                      per_position)
        if score > best + 1e-9:
            best_k, best = k, score
    return best_k


class AcceptanceTracker:
    """Moving averages of the acceptance rate and of the draft cost ratio,
    updated after each verify step.

    The cost ratio starts at ``cost_prior``, which counts as one
    observation: while few steps are timed it is their running mean with
    the prior, then an exponential moving average (``weight``). One step
    never sets it outright: a single slow step (the machine stalling, a
    draft that still had one-off work in it) would otherwise decide
    speculation off, and with speculation off only the rare probe steps
    are timed to bring it back."""

    def __init__(self, prior: float = 0.5, weight: float = 0.1, cost_prior: float = 0.0):
        self.alpha = prior
        self.draft_ratio = cost_prior
        self.weight = weight
        self._timed = 0  # steps whose draft cost was observed

    def observe(self, proposed: int, accepted: int, draft_s: float | None, step_s: float) -> None:
        """``draft_s``: seconds per draft position of this step's drafting
        (per step for a proposer whose cost does not grow with the length),
        without one-off work (None: not measured this step); ``step_s``:
        the verify step without the drafting."""
        if proposed > 0:
            w = min(1.0, self.weight * proposed)  # a step with more drafts says more
            self.alpha += w * (accepted / proposed - self.alpha)
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

    def __init__(self, max_k: int, saturation_tokens: int, adaptive: bool = True,
                 disable_batch_size: int | None = None,
                 tracker: AcceptanceTracker | None = None, per_position: bool = True):
        self.max_k = max_k
        self.per_position = per_position  # the draft's cost: Proposer.cost_per_position
        self.saturation_tokens = saturation_tokens
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
        k = choose_num_tokens(max_k, batch, t.alpha, self.saturation_tokens, t.draft_ratio,
                              per_position=self.per_position)
        if k > 0:
            self.idle_steps = 0
            return k
        if choose_num_tokens(max_k, batch, 1.0, self.saturation_tokens, t.draft_ratio,
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
        return choose_num_tokens(self.max_k, batch, 1.0, self.saturation_tokens,
                                 self.tracker.draft_ratio, per_position=self.per_position) == 0
