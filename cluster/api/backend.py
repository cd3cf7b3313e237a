"""The seam between the client APIs (HTTP, gRPC) and whatever generates.

``Backend`` is what both ingresses call. ``LocalBackend`` runs colocated
engines in this process (the single-process mode, and the reference the
cluster is compared with); ``splitserve.cluster.serve.orchestrator.ClusterBackend`` places each
request on a prefill/decode pair through the router. Both yield the same
output dicts (``splitserve.engine.outputs.RequestOutput.to_dict``):

  {request_id, token_ids, text, finished, finish_reason, prompt_tokens,
   completion_tokens, cached_tokens, logprobs?, timings?}

The ingresses call ``tokenizer``, ``tool_call_parser``, ``reasoning_parser``
and ``validate`` from
their preparation threads (splitserve.cluster.api.prepare), not from the
event loop: these must be thread-safe and must not touch the loop.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import AsyncIterator

from splitserve.engine.errors import SplitserveError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tokenizer import Tokenizer


class UnknownModel(SplitserveError, LookupError):
    def __init__(self, model: str, known: list[str]):
        super().__init__(f"model {model!r} is not served here; available: {', '.join(known)}")
        self.model = model


class Overloaded(SplitserveError):
    """Queues are full; the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(SplitserveError):
    """No replica can take the request right now (none up, router down)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    created: int


class Backend(abc.ABC):
    @abc.abstractmethod
    def models(self) -> list[ModelInfo]:
        """Served models, in config order."""

    def model_info(self, model: str) -> ModelInfo:
        """The served model's card; raises UnknownModel."""
        served = self.models()
        for m in served:
            if m.name == model:
                return m
        raise UnknownModel(model, [m.name for m in served])

    @abc.abstractmethod
    def tokenizer(self, model: str) -> Tokenizer:
        """The model's tokenizer; raises UnknownModel."""

    @abc.abstractmethod
    def validate(self, model: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError (with ``param``) or UnknownModel before
        any work starts; called by ingresses so bad input fails fast."""

    @abc.abstractmethod
    def generate(self, model: str, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[dict]:
        """Stream output dicts. Raises UnknownModel, InvalidRequestError,
        Overloaded or Unavailable. Closing the iterator cancels the request
        everywhere and frees its KV blocks."""

    def tool_call_parser(self, model: str) -> str:
        """The model's tool-call format (splitserve.cluster.api.tool_calls.PARSER_NAMES);
        auto: detected from its chat template."""
        return "auto"

    def reasoning_parser(self, model: str) -> str:
        """The model's reasoning format (splitserve.cluster.api.reasoning.PARSER_NAMES);
        auto: detected from its chat template."""
        return "auto"

    async def close(self) -> None:
        pass


class LocalBackend(Backend):
    """Colocated engines in this process, one per model."""

    def __init__(self, engines: dict, tool_call_parsers: dict[str, str] | None = None,
                 reasoning_parsers: dict[str, str] | None = None):
        from splitserve.engine.async_engine import AsyncEngine

        self._engines = dict(engines)
        self._parsers = dict(tool_call_parsers or {})
        self._reasoning = dict(reasoning_parsers or {})
        self._async = {n: AsyncEngine(e, name=f"engine-{n}").start() for n, e in engines.items()}
        self._created = int(time.time())

    def _engine(self, model: str):
        try:
            return self._engines[model]
        except KeyError:
            raise UnknownModel(model, list(self._engines)) from None

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(n, e.max_model_len, self._created) for n, e in self._engines.items()]

    def tokenizer(self, model: str) -> Tokenizer:
        return self._engine(model).tokenizer

    def tool_call_parser(self, model: str) -> str:
        self._engine(model)
        return self._parsers.get(model, "auto")

    def reasoning_parser(self, model: str) -> str:
        self._engine(model)
        return self._reasoning.get(model, "auto")

    def validate(self, model, prompt_token_ids, params) -> None:
        self._engine(model).validate(prompt_token_ids, params)

    async def generate(self, model, request_id, prompt_token_ids, params):
        from splitserve.engine.async_engine import EngineDeadError

        self._engine(model)
        try:
            async for out in self._async[model].generate(request_id, prompt_token_ids, params):
                yield out.to_dict()
        except EngineDeadError as e:
            raise Unavailable(f"the engine for {model!r} is not running: {e}") from None

    async def close(self) -> None:
        for a in self._async.values():
            a.stop()

    def all_blocks_free(self) -> bool:
        return all(e.kv.all_free() for e in self._engines.values())
