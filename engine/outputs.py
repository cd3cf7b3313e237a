"""What the engine returns per step: incremental outputs per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    new_logprobs: list[Any] | None = None  # TokenLogprobs per new token
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CompletionResult:
    """A whole request's result, for ``LLMEngine.generate``."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[Any] | None = None
    num_cached_tokens: int = 0
