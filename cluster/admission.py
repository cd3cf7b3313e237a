"""AdmissionBackend: a bounded number of in-flight requests per model.

Wraps any ``Backend``. A request past its model's limit is refused at once
with ``Overloaded`` (HTTP 429 / gRPC RESOURCE_EXHAUSTED with a retry-after)
instead of queueing behind the admitted ones, so admitted requests keep
their latency under overload. A request holds its slot from the moment
its stream is first read until the stream ends, fails or is closed.
"""

from __future__ import annotations

from collections import Counter
from typing import AsyncIterator

from cluster.backend import Backend, ModelInfo, Overloaded
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


class AdmissionBackend(Backend):
    def __init__(self, inner: Backend, max_in_flight: int | dict[str, int],
                 retry_after_s: float = 1.0):
        """``max_in_flight``: one limit for every model, or a limit per model
        name (models missing from the dict are not limited)."""
        limits = max_in_flight if isinstance(max_in_flight, dict) else None
        for name, n in (limits or {"*": max_in_flight}).items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"max_in_flight for {name!r} must be a positive integer, got {n!r}")
        if retry_after_s <= 0:
            raise ValueError(f"retry_after_s must be positive, got {retry_after_s}")
        self.inner = inner
        self._limits = limits
        self._default = None if limits is not None else int(max_in_flight)
        self.retry_after_s = retry_after_s
        self._in_flight: Counter[str] = Counter()
        self.refused = 0

    def limit(self, model: str) -> int | None:
        return self._limits.get(model) if self._limits is not None else self._default

    def in_flight(self, model: str) -> int:
        return self._in_flight[model]

    def models(self) -> list[ModelInfo]:
        return self.inner.models()

    def tokenizer(self, model: str) -> Tokenizer:
        return self.inner.tokenizer(model)

    def tool_call_parser(self, model: str) -> str:
        return self.inner.tool_call_parser(model)

    def validate(self, model: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.inner.validate(model, prompt_token_ids, params)

    async def generate(self, model: str, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[dict]:
        limit = self.limit(model)
        # Checked and taken with no await in between: the event loop cannot
        # interleave another admission, so the count never exceeds the limit.
        if limit is not None and self._in_flight[model] >= limit:
            self.refused += 1
            raise Overloaded(
                f"model {model!r} already has {limit} requests in flight; retry after "
                f"{self.retry_after_s:g} s", self.retry_after_s)
        self._in_flight[model] += 1
        stream = self.inner.generate(model, request_id, prompt_token_ids, params)
        try:
            async for out in stream:
                yield out
        finally:
            self._in_flight[model] -= 1
            await stream.aclose()

    async def close(self) -> None:
        await self.inner.close()
