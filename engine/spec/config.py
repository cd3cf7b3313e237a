"""How one engine speculates: the method, how many draft tokens, and when
to stop (``EngineConfig.speculative``; the operator file's
``speculative`` section of a model builds it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"  # a name in splitserve.engine.spec.proposer.PROPOSERS
    num_speculative_tokens: int = 4  # most draft tokens verified per sequence and step
    draft_model: str | None = None  # method "draft": the draft checkpoint's directory
    ngram_min: int = 1  # method "ngram": shortest suffix looked up
    ngram_max: int = 4  # method "ngram": longest suffix looked up (tried first)
    # the rule of splitserve.engine.spec.adaptive; False: always the full length
    adaptive: bool = True
    # speculate only while the running batch is at most this large (None: any)
    disable_batch_size: int | None = None
    # tokens a step holds before its time grows with its size (decode is
    # memory-bound below it): verify tokens up to here cost nearly nothing.
    # None: by device (splitserve.engine.spec.adaptive.default_saturation_tokens)
    saturation_tokens: int | None = None
    # the draft model's KV blocks; None: as many as the target's (its KV is smaller)
    draft_num_blocks: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be in [1, 32], got "
                             f"{self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, "
                             f"{self.ngram_max}")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs draft_model (a checkpoint)")
        if self.disable_batch_size is not None and self.disable_batch_size < 1:
            raise ValueError("disable_batch_size must be at least 1")
        if self.saturation_tokens is not None and self.saturation_tokens < 1:
            raise ValueError("saturation_tokens must be at least 1")
        if self.draft_num_blocks is not None and self.draft_num_blocks < 1:
            raise ValueError("draft_num_blocks must be at least 1")
