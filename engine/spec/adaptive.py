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
step relative to one target step (about 0 for n-gram lookup). The engine
verifies the ``k`` in ``[0, num_speculative_tokens]`` with the largest
``E(k) / C(k)``; ``k = 0`` (no speculation) scores 1. So a small batch
speculates the full length, a batch large enough that verifying costs
more than it yields stops, and a low acceptance shortens the drafts first.
``disable_batch_size`` switches speculation off above a batch size
outright. When the rule turns speculation off on acceptance alone, one
step in ``decoder.PROBE_INTERVAL`` speculates the full length so the
acceptance rate is measured again. Plain Python, no tensors.
"""

from __future__ import annotations

# ``saturation_tokens`` when the operator leaves it unset, by device type.
# A GPU reads the weights once per decode step and leaves most of its
# arithmetic idle: a 7-8B model's step time stays flat to a few hundred
# tokens. A CPU has no such slack: its matrix products already take time in
# proportion to their rows at a few tokens (the default model on a 2-vCPU
# Xeon, one thread: a verify step of 5 tokens costs 1.4-1.8x a 1-token
# step, docs/benchmarks.md), so only a handful of tokens ride free.
SATURATION_TOKENS = {"cuda": 256, "cpu": 4}


def default_saturation_tokens(device_type: str) -> int:
    """The knee of the step time on ``device_type`` ("cuda", "cpu", ...);
    other accelerators are taken to be GPU-like."""
    return SATURATION_TOKENS.get(device_type, SATURATION_TOKENS["cuda"])


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify step yields per sequence with ``k`` drafts."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def step_cost(batch: int, k: int, saturation_tokens: int, draft_ratio: float) -> float:
    """A verify step's time relative to a plain decode step of ``batch``."""
    s = float(saturation_tokens)
    return max(1.0, batch * (k + 1) / s) / max(1.0, batch / s) + k * draft_ratio


def choose_num_tokens(max_k: int, batch: int, alpha: float, saturation_tokens: int,
                      draft_ratio: float = 0.0, disable_batch_size: int | None = None) -> int:
    """The speculation length for this step (0: do not speculate)."""
    if batch <= 0 or (disable_batch_size is not None and batch > disable_batch_size):
        return 0
    best_k, best = 0, 1.0
    for k in range(1, max_k + 1):
        score = expected_tokens(alpha, k) / step_cost(batch, k, saturation_tokens, draft_ratio)
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
        """``draft_s``: seconds per draft position of this step's drafting,
        without one-off work (None: not measured this step); ``step_s``:
        the verify step without the drafting."""
        if proposed > 0:
            w = min(1.0, self.weight * proposed)  # a step with more drafts says more
            self.alpha += w * (accepted / proposed - self.alpha)
        if draft_s is not None and step_s > 0:
            self._timed += 1
            w = max(self.weight, 1.0 / (self._timed + 1))
            self.draft_ratio += w * (draft_s / step_s - self.draft_ratio)
