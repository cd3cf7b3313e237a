"""Per-request sampling parameters, with the OpenAI API's names and ranges.

``SamplingParams`` travels between processes (ingress -> prefill -> decode)
as the plain dict of ``to_dict()``; ``from_dict()`` rebuilds and validates
it on the receiving side, so a replica never samples with parameters that
ingress would have refused.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import (MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_STOP_STRING_CHARS,
                                      MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS)
from splitserve.engine.structured import check_spec

MAX_SEED = 2**63  # exclusive; seeds are signed 64-bit on the wire
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range: [-100, 100]


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: until EOS, a stop, or the model's context length
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # <= 0 means off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-N alternatives; 0 = only the chosen token's logprob
    # the same for every prompt token after the first (scoring a text): the
    # prompt is then computed whole, without prefix-cache hits
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # {"type": "json" | "regex" | "grammar", "value": text}: see splitserve.engine.structured
    structured_output: dict[str, str] | None = None
    # Set by the cluster when a request resumes on another replica: the last
    # ``resumed_tokens`` prompt tokens are this request's own earlier output.
    # Seeded sampling, presence/frequency penalties and the structured-output
    # grammar count them as output, so the resumed stream continues as the
    # first one would have; max_tokens and min_tokens count only new tokens.
    resumed_tokens: int = 0
    # speculative decoding where the serving engine has it on; False opts
    # this request out (its steps verify no draft tokens)
    speculative: bool = True

    def __post_init__(self) -> None:
        # The OpenAI API accepts a single stop string as well as a list.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        self.logit_bias = {} if self.logit_bias is None else self.logit_bias

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def validate(self) -> "SamplingParams":
        """Raise ``InvalidRequestError`` naming the first bad field; return self."""
        _check_float(self.temperature, "temperature", 0.0, 2.0)
        _check_float(self.top_p, "top_p", 0.0, 1.0)
        if self.top_p <= 0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        _check_int(self.top_k, "top_k")
        if self.top_k < -1:
            raise InvalidRequestError(
                f"top_k must be -1 or 0 (off) or a positive number of tokens, got {self.top_k}",
                param="top_k",
            )
        _check_float(self.min_p, "min_p", 0.0, 1.0)
        _check_float(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        _check_float(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        _check_float(self.repetition_penalty, "repetition_penalty", 0.0, None)
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(
                f"repetition_penalty must be > 0 (1.0 is off), got {self.repetition_penalty}",
                param="repetition_penalty",
            )
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens")
            if self.max_tokens < 1:
                raise InvalidRequestError(
                    f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens"
                )
        _check_int(self.min_tokens, "min_tokens")
        if self.min_tokens < 0:
            raise InvalidRequestError(
                f"min_tokens must be >= 0, got {self.min_tokens}", param="min_tokens"
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                param="min_tokens",
            )
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None:
                _check_int(n, name)
                if not 0 <= n <= MAX_LOGPROBS:
                    raise InvalidRequestError(
                        f"{name} must be between 0 and {MAX_LOGPROBS}, got {n}", param=name)
        self._validate_stop()
        self._validate_logit_bias()
        if self.structured_output is not None:
            check_spec(self.structured_output)
        _check_int(self.resumed_tokens, "resumed_tokens")
        if self.resumed_tokens < 0:
            raise InvalidRequestError(
                f"resumed_tokens must be >= 0, got {self.resumed_tokens}", param="resumed_tokens")
        _check_int(self.n, "n")
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        if self.seed is not None:
            _check_int(self.seed, "seed")
            if not 0 <= self.seed < MAX_SEED:
                raise InvalidRequestError(
                    f"seed must be an integer in [0, 2**63), got {self.seed}", param="seed"
                )
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
                     "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(
                    f"{name} must be true or false, got {getattr(self, name)!r}", param=name
                )
        return self

    def _validate_stop(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}",
                param="stop",
            )
        for s in self.stop:
            if not isinstance(s, str):
                raise InvalidRequestError(f"stop entries must be strings, got {s!r}", param="stop")
            if not s:
                raise InvalidRequestError("stop strings must not be empty", param="stop")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, "
                    f"got one of {len(s)}",
                    param="stop",
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"stop_token_ids accepts at most {MAX_STOP_TOKEN_IDS} ids, got "
                f"{len(self.stop_token_ids)}", param="stop_token_ids")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InvalidRequestError(
                    f"stop_token_ids must be non-negative integers, got {t!r}",
                    param="stop_token_ids",
                )

    def _validate_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, dict):
            raise InvalidRequestError(
                f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"[:200],
                param="logit_bias")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"logit_bias accepts at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}",
                param="logit_bias")
        for t, v in self.logit_bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InvalidRequestError(
                    f"logit_bias keys must be non-negative token ids, got {t!r}"[:200],
                    param="logit_bias")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or abs(v) > LOGIT_BIAS_LIMIT:
                raise InvalidRequestError(
                    f"logit_bias values must be numbers between -{LOGIT_BIAS_LIMIT:g} and "
                    f"{LOGIT_BIAS_LIMIT:g}, got {v!r} for token {t}"[:200], param="logit_bias")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (ints, floats, bools, lists, None), JSON-safe:
        ``logit_bias`` travels as a list of [token id, bias] pairs. Fields at
        their default are left out (``from_dict`` restores them), so while a
        rolling upgrade mixes versions a receiver that predates a parameter
        refuses only the requests that use it."""
        d = {k: v for k, v in asdict(self).items() if v != _DEFAULTS[k]}
        if "logit_bias" in d:
            d["logit_bias"] = [[t, v] for t, v in self.logit_bias.items()]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        """Rebuild from ``to_dict()`` output and validate; unknown keys are
        refused so that a sender and receiver at different versions fail
        loudly instead of silently dropping a parameter."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise InvalidRequestError(f"unknown sampling parameter {key!r}", param=str(key))
        bias = data.get("logit_bias")
        if isinstance(bias, list):
            try:
                data = {**data, "logit_bias": {t: v for t, v in bias}}
            except (TypeError, ValueError):
                raise InvalidRequestError("logit_bias must be a list of [token id, bias] pairs",
                                          param="logit_bias") from None
        return cls(**data).validate()


_DEFAULTS = {f.name: f.default if f.default is not MISSING else f.default_factory()
             for f in fields(SamplingParams)}


def _check_int(value: Any, name: str) -> None:
    # bool is an int subclass; `"n": true` is a client bug, not n=1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", param=name)


def _check_float(value: Any, name: str, lo: float, hi: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", param=name)
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}", param=name)
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise InvalidRequestError(f"{name} must be {bounds}, got {value}", param=name)


def validate_request(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int,
                     vocab_size: int | None = None) -> None:
    """Raise InvalidRequestError (naming ``param``) if a request with this
    prompt and these parameters cannot run in a context of ``max_model_len``
    tokens. Shared by engines and ingresses so both refuse the same input."""
    params.validate()
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if params.resumed_tokens >= n:
        raise InvalidRequestError(
            f"resumed_tokens={params.resumed_tokens} must be below the prompt's {n} tokens",
            param="resumed_tokens")
    if n >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {n} tokens but this model's context is {max_model_len} tokens "
            "(at least one token must remain for the completion)", param="prompt")
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            f"max_tokens={params.max_tokens} plus the prompt's {n} tokens exceeds the context of "
            f"{max_model_len} tokens; at most {max_model_len - n} tokens can be generated",
            param="max_tokens")
    if params.max_tokens is None and n + params.min_tokens > max_model_len:
        # without max_tokens the context bounds the output; min_tokens past it can never be met
        raise InvalidRequestError(
            f"min_tokens={params.min_tokens} plus the prompt's {n} tokens exceeds the context of "
            f"{max_model_len} tokens; at most {max_model_len - n} tokens can be generated",
            param="min_tokens")
    if vocab_size is not None:
        bad = next((t for t in params.logit_bias if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"logit_bias token id {bad} is outside the vocabulary [0, {vocab_size})",
                param="logit_bias")
        bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
        if bad is not None:  # the model can never produce it: the stop would never match
            raise InvalidRequestError(
                f"stop_token_ids id {bad} is outside the vocabulary [0, {vocab_size})",
                param="stop_token_ids")
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary [0, {vocab_size})", param="prompt")
