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
    # on a request's first output, when asked for: None for the first prompt
    # token, then TokenLogprobs of each prompt token given those before it
    prompt_logprobs: list[Any] | None = None
    # engine clock (time.monotonic): arrival, first_scheduled, first_token
    metrics: dict[str, float] = field(default_factory=dict)
    # the request failed alone (RequestFailedError): its last output, no token
    error: Exception | None = None

    def queue_s(self) -> float:
        """Seconds the request waited in the engine's queue before its first step."""
        m = self.metrics
        return max(m.get("first_scheduled", 0.0) - m.get("arrival", 0.0), 0.0)

    def to_dict(self) -> dict[str, Any]:
        """The wire form streamed to ingresses (msgpack/JSON-able)."""
        d: dict[str, Any] = {
            "request_id": self.request_id, "token_ids": self.new_token_ids, "text": self.new_text,
            "finished": self.finished, "finish_reason": self.finish_reason,
            "prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_output_tokens,
            "cached_tokens": self.num_cached_tokens}
        if self.new_logprobs:
            d["logprobs"] = [logprob_dict(lp) for lp in self.new_logprobs]
        if self.prompt_logprobs is not None:
            d["prompt_logprobs"] = [None if lp is None else logprob_dict(lp)
                                    for lp in self.prompt_logprobs]
        return d


def logprob_dict(lp: Any) -> dict[str, Any]:
    """A TokenLogprobs in wire form."""
    return {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}


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
    prompt_logprobs: list[Any] | None = None
    error: str | None = None  # why it failed alone (RequestFailedError), else None
