"""Prompt lookup: the n-gram proposer.

The last n tokens of a sequence (n from ``ngram_max`` down to
``ngram_min``, longest first) are looked up in the sequence itself (prompt
and output); at their latest earlier occurrence, the tokens that followed
are proposed. Edits of code or text copy long runs of the prompt, so a
short suffix often predicts many tokens. No model, no state.

The lookup is a byte search (``bytes.rfind``) over the tokens packed as
4-byte integers, so it runs in C: a 4k-token sequence costs microseconds.
"""

from __future__ import annotations

from array import array

from splitserve.engine.sequence import Sequence
from splitserve.engine.spec.config import SpeculativeConfig
from splitserve.engine.spec.proposer import Proposer, ProposerContext, register_proposer


def ngram_lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the
    longest suffix of ``tokens`` (length n_max down to n_min) found."""
    if k <= 0 or len(tokens) <= n_min:
        return []
    packed = array("i", tokens).tobytes()
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = packed[-4 * n:]
        # an occurrence must end before the last token, so one token follows it
        limit = 4 * (len(tokens) - 1)
        while (at := packed.rfind(suffix, 0, limit)) >= 0:
            if at % 4 == 0:
                start = at // 4 + n
                return tokens[start:start + k]
            limit = at + 4 * n - 1  # a hit across token boundaries: look before it
    return []


class NgramProposer(Proposer):
    cost_per_position = False  # one lookup yields the whole run

    def __init__(self, cfg: SpeculativeConfig):
        self.n_min, self.n_max = cfg.ngram_min, cfg.ngram_max

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        return [ngram_lookup(s.token_ids, self.n_min, self.n_max, k)
                for s, k in zip(seqs, num_tokens)]


@register_proposer("ngram")
def _make(cfg: SpeculativeConfig, ctx: ProposerContext) -> Proposer:
    return NgramProposer(cfg)
