"""The engine's ``Sequence`` with block identities given, not hashed.

The simulator does not model token contents, only which blocks of which
prompts are equal (the prefix structure a trace's hash ids describe). A
``SimSequence`` therefore takes its prompt's full-block hashes precomputed
(``workload.prompt_block_hashes``) and names the blocks of its output by a
cheap chained integer hash keyed by the request; everything else (token
counts, computed counts, the scheduler's and KV manager's use of them) is
the production class. Its token ids are zeros: nothing reads them.
"""

from __future__ import annotations

from splitserve.engine.sequence import Sequence

MASK64 = (1 << 64) - 1


def output_block_hash(parent: int, request_key: int, index: int) -> int:
    return hash((parent, request_key, index)) & MASK64


class SimSequence(Sequence):
    def __init__(self, seq_id: str, prompt_len: int, prompt_hashes: list[int], block_size: int,
                 request_key: int, target_output: int, arrival_time: float,
                 prefill_only: bool = False):
        super().__init__(seq_id, [0] * prompt_len, None, block_size, arrival_time=arrival_time)
        self._sim_hashes = list(prompt_hashes[: prompt_len // block_size])
        self.request_key = request_key
        self.target_output = target_output  # tokens this sequence produces before it ends
        self.prefill_only = prefill_only  # a prefill replica's: done at its first token

    def block_hashes(self) -> list[int]:
        hashes = self._sim_hashes
        full = len(self.token_ids) // self.block_size
        while len(hashes) < full:
            hashes.append(output_block_hash(hashes[-1] if hashes else 0, self.request_key,
                                            len(hashes)))
        # the memo itself when it is exactly the full blocks (its readers copy
        # or slice it): no copy per call
        return hashes if len(hashes) == full else hashes[:full]

    @property
    def done(self) -> bool:
        return self.num_output_tokens >= self.target_output
