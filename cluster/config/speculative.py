"""A model's ``speculative`` section: speculative decoding on its decode
(and colocated) replicas. Prefill replicas never speculate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import _Strict


class SpeculativeSpec(_Strict):
    method: Literal["ngram", "draft"] = Field(
        ..., description="ngram: prompt lookup (the tokens that followed the latest earlier "
        "occurrence of the sequence's last n tokens; no model); draft: a small checkpoint with "
        "the same tokenizer drafts greedily.")
    num_speculative_tokens: int = Field(4, ge=1, le=32, description="Most draft tokens "
                                        "verified per sequence and step.")
    draft_model: str | None = Field(None, description="method draft: the draft checkpoint, a "
                                    "directory or a Hugging Face repo id (same tokenizer as the "
                                    "model).")
    draft_revision: str | None = Field(None, description="Branch, tag or commit of a draft "
                                       "repo id; None: main.")
    ngram_min: int = Field(1, ge=1, description="method ngram: shortest suffix looked up.")
    ngram_max: int = Field(4, ge=1, description="method ngram: longest suffix looked up "
                           "(tried first).")
    adaptive: bool = Field(True, description="Choose the speculation length each step from the "
                           "running batch size and the measured acceptance rate (0 turns it "
                           "off while verifying costs more than it yields); false: always "
                           "num_speculative_tokens.")
    disable_batch_size: int | None = Field(None, ge=1, description="Speculate only while at "
                                           "most this many sequences run; None: no limit.")
    saturation_tokens: int | None = Field(None, ge=1, description="Tokens one engine step "
                                          "holds before its time grows with its size (the "
                                          "adaptive rule's knee); None: by device, a knee at "
                                          "256 on GPUs, a measured curve on CPUs.")
    draft_num_blocks: int | None = Field(None, ge=16, description="method draft: KV blocks of "
                                         "the draft model; None: as many as the model's.")

    @model_validator(mode="after")
    def _consistent(self) -> "SpeculativeSpec":
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method draft needs draft_model")
        if self.method == "ngram" and self.draft_model:
            raise ValueError("draft_model is only read by method draft")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) > ngram_max ({self.ngram_max})")
        return self
