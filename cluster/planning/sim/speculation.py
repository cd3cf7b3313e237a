"""Speculative decoding on a simulated decode (or colocated) replica.

Each step the engine's own ``LengthRule`` (``engine.spec.adaptive``, with
its ``AcceptanceTracker``) picks the speculation length from the running
batch, the acceptance measured so far and the draft cost, as
``SpecDecoder.propose`` does; the sequences that may be drafted for get
that many draft tokens (cut to their remaining output) and the production
``Scheduler`` schedules and allocates their verify tokens. The replica
times the verify step from its step-time model (each sequence's drafts run
as a chunk of query tokens after its context: compute for every token, one
read of the context) plus, for method ``draft``, the draft model's steps.

Tokens are not modelled, so acceptance is drawn: each draft is accepted
with probability ``acceptance`` while the ones before it were (the model
behind ``adaptive.expected_tokens``), from a random stream seeded by the
simulation's seed and the replica's name, so a run is deterministic for
its seed. The rate is ``SimOptions.spec_acceptance_ngram`` /
``spec_acceptance_draft`` when given (the planner passes the rate its
estimate used); else the profile database's measured rate for the model and
method (``planning.acceptance.resolve``, ``SimOptions.spec_workload``
choosing the workload), else ``ASSUMED_ACCEPTANCE``.
"""

from __future__ import annotations

import random

from splitserve.cluster.planning.acceptance import ASSUMED_ACCEPTANCE
from splitserve.engine.spec.adaptive import LengthRule, step_curve

__all__ = ["ASSUMED_ACCEPTANCE", "DRAFT_COST_RATIO", "SimSpeculator"]
# method draft: one draft-model decode step's time relative to the target
# model's decode step of the same batch (a draft a tenth the size, read once
# per step like the target); n-gram lookup costs nothing on the device
DRAFT_COST_RATIO = 0.1


class SimSpeculator:
    """One replica's speculation state: the length rule and its tracker,
    and the acceptance draws."""

    def __init__(self, method: str, num_speculative_tokens: int, adaptive: bool,
                 disable_batch_size: int | None, saturation_tokens: int | None,
                 device_type: str, acceptance: float, draft_cost_ratio: float, seed: str):
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance rate must be in [0, 1], got {acceptance}")
        self.method = method
        self.acceptance = acceptance
        self.draft_cost_ratio = draft_cost_ratio if method == "draft" else 0.0
        # prompt lookup drafts a whole run in one search, as the engine's
        # NgramProposer (cost_per_position False) tells its rule
        self.rule = LengthRule(num_speculative_tokens, step_curve(saturation_tokens, device_type),
                               adaptive, disable_batch_size, per_position=method != "ngram")
        self.rng = random.Random(seed)
        self.last_k = 0
        # cumulative, as the engine's SpecCounters
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.verify_steps = 0
        self.verified = 0  # sequences verified with at least one draft

    @classmethod
    def from_spec(cls, spec, device_type: str, acceptance: float, draft_cost_ratio: float,
                  seed: str) -> "SimSpeculator":
        """From a model's ``speculative`` section (``cluster.config.SpeculativeSpec``)."""
        return cls(spec.method, spec.num_speculative_tokens, spec.adaptive,
                   spec.disable_batch_size, spec.saturation_tokens, device_type, acceptance,
                   draft_cost_ratio, seed)

    def quiet(self, batch: int) -> bool:
        """No step at this batch size speculates, whatever the acceptance."""
        return self.rule.quiet(batch)

    def drafts(self, running: list) -> dict[str, list[int]]:
        """Draft tokens per sequence id for ``Scheduler.schedule``: the rule's
        length for this batch, cut to each sequence's remaining output."""
        cands = [s for s in running
                 if s.num_tokens - s.num_computed_tokens == 1 and not s.prefill_only]
        k = self.rule.length(len(running), bool(cands))
        self.last_k = k
        if k == 0:
            return {}
        out = {}
        for s in cands:
            n = min(k, s.target_output - s.num_output_tokens - 1)
            if n > 0:
                out[s.seq_id] = [0] * n
        return out

    def draw(self, k: int) -> int:
        """Accepted drafts of a sequence verified with ``k``."""
        rng, a = self.rng, self.acceptance
        j = 0
        while j < k and rng.random() < a:
            j += 1
        return j

    def accept(self, seq, k: int, kv) -> tuple[int, bool]:
        """Verify the ``k`` drafts of ``seq`` (its first token of the step is
        taken): a drawn number accepted, their KV standing and each an
        output token, the KV blocks of the rest trimmed, as
        ``SpecDecoder.finish_verify`` does. Returns how many were accepted
        and whether a rejected draft cut the run short."""
        j = self.draw(k)
        for i in range(j):
            seq.num_computed_tokens += 1
            seq.append_token(0)
            if seq.done:
                return i + 1, False
        kv.trim(seq.seq_id, seq.num_tokens)
        kv.cache_full_blocks(seq)
        return j, j < k

    def draft_position_s(self, plain_step_s: float) -> float:
        """Seconds one draft position takes (all sequences at once)."""
        return self.draft_cost_ratio * plain_step_s

    def observe(self, runs: int, proposed: int, accepted: int, draft_s: float,
                verify_s: float, rejected: int) -> None:
        """A verify step's outcome (``runs`` sequences verified, ``rejected``
        of them cut short by a rejected draft), to the tracker as the engine
        reports it."""
        self.verified += runs
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.verify_steps += 1
        self.rule.tracker.observe(proposed, accepted, draft_s, verify_s, rejected)
