"""The OpenAI API's wire format: request bodies (read within a size limit,
parsed and validated), errors, and the choice, logprobs and usage objects
of responses.

Requests are validated strictly (a string where a number belongs is a 400,
not a coercion) and unknown fields are refused, as OpenAI does. Fields the
API defines but splitserve does not implement are accepted only at their
"off" value, and otherwise refused naming the field, so that no request is
silently served differently from what it asked for.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from cluster.openai_structured import structured_output
from cluster.tool_calls import ToolCalls
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

# OpenAI's default for /v1/completions; chat completions default to no limit.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# JSON has no -inf; a token the request's filters removed reports this.
MIN_LOGPROB = -9999.0
ERROR_MESSAGE_CHARS = 1024  # error bodies stay small whatever the request echoed


class ApiError(Exception):
    """An HTTP error in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        message = self.message
        if len(message) > ERROR_MESSAGE_CHARS:
            message = message[: ERROR_MESSAGE_CHARS - 3] + "..."
        param = self.param[:200] if self.param else self.param
        return {"error": {"message": message, "type": self.type, "param": param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted for vLLM clients; usage comes at the end


_NULLABLE_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                      "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids")


class _Common(_Body):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's extension: exactly one of json (schema), regex, grammar (Lark), choice
    structured_outputs: dict[str, Any] | None = None
    user: str | None = None  # accepted and ignored
    # Accepted and ignored: they concern OpenAI's hosted service.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true",
                                      param="stream_options")

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Fields left unset (or null) take SamplingParams' defaults. Not
        validated here: the backend validates (and knows the context length)."""
        given = {name: getattr(self, name) for name in _NULLABLE_SAMPLING
                 if getattr(self, name) is not None}
        return SamplingParams(
            max_tokens=max_tokens, logprobs=logprobs, n=self.num_choices, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=_token_keys(self.logit_bias or {}),
            structured_output=structured_output(self.response_format, self.structured_outputs),
            **given)


def _token_keys(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as JSON strings."""
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key[:40]!r}", param="logit_bias") from None
    return out


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise InvalidRequestError("best_of other than n is not supported", param="best_of")

    def prompt_input(self) -> str | list[int]:
        """The one prompt of this request: text, or token ids."""
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        elif isinstance(p, list) and p and not isinstance(p[0], int):
            raise InvalidRequestError(
                f"a request takes one prompt, got {len(p)}; send one request per prompt",
                param="prompt")
        if isinstance(p, str) and not p:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template(self, index: int) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined into one
        string (with newlines, like vLLM), since most templates read content
        as a string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(
                        f"messages[{index}].content: only text parts are supported, got a "
                        f"{part.type[:40]!r} part", param=f"messages[{index}].content")
                texts.append(part.text)
            content = "\n".join(texts)
        msg = {"role": self.role, "content": content, "name": self.name,
               "tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id}
        return {k: v for k, v in msg.items() if v is not None}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true",
                                      param="top_logprobs")

    @property
    def max_tokens_param(self) -> str:
        """The field the client used for the output length (named in errors)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template(i) for i, m in enumerate(self.messages)]


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def param_of(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location as a field path (``messages[0].role``).
    Union members appear in locations as type names (``list[int]``); the path
    stops before them."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _UNION_TAGS:
            path += f".{part}" if path else part
        else:
            break
    return path or None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_body_bytes: int) -> dict:
    """The request's JSON object; never holds more than ``max_body_bytes``."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise ApiError(400, f"Content-Type must be application/json, got {ctype[:100]!r}",
                           code="invalid_content_type")
    too_large = ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes",
                         code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "invalid Content-Length header", code="invalid_request")
        if int(length) > max_body_bytes:
            raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise too_large
    except ClientDisconnect:  # nobody will read the answer; not a server fault
        raise ApiError(400, "the client disconnected while sending the body",
                       code="client_disconnected") from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})",
                       code="invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return data


def parse_body(model_cls: type[_Body], data: dict) -> Any:
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        first = errors[0]
        parts = [f"{param_of(err['loc']) or 'body'}: {err['msg']}" for err in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ApiError(400, "; ".join(parts) + more, param=param_of(first["loc"]),
                       code="invalid_type" if first["type"] != "extra_forbidden"
                       else "unknown_parameter") from None


# -- responses -----------------------------------------------------------------

def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, logprobs: list[dict], text_offset: int) -> dict:
    """The /v1/completions ``logprobs`` object of some tokens; ``text_offset``
    is the completion's length before them."""
    tokens, chosen, tops, offsets = [], [], [], []
    for lp in logprobs:
        tok = token_text(tokenizer, lp["token_id"])
        tokens.append(tok)
        chosen.append(finite(lp["logprob"]))
        tops.append({token_text(tokenizer, t): finite(v) for t, v in lp["top"]})
        offsets.append(text_offset)
        text_offset += len(tok)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}


def _chat_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    tok = token_text(tokenizer, token_id)
    return {"token": tok, "logprob": finite(logprob), "bytes": list(tok.encode("utf-8"))}


def chat_logprobs(tokenizer: Tokenizer, logprobs: list[dict]) -> dict:
    """The chat ``logprobs`` object ({"content": [...]}) of some tokens."""
    content = []
    for lp in logprobs:
        entry = _chat_entry(tokenizer, lp["token_id"], lp["logprob"])
        entry["top_logprobs"] = [_chat_entry(tokenizer, t, v) for t, v in lp["top"]]
        content.append(entry)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


Kind = Literal["completion", "chat"]


class ChoiceState:
    """One choice of a response: what its outputs added up to so far, and
    the OpenAI JSON of each output (streaming) and of the whole (final)."""

    def __init__(self, index: int, kind: Kind, tokenizer: Tokenizer, want_logprobs: bool,
                 tool_calls: ToolCalls | None = None):
        self.index, self.kind, self.tokenizer = index, kind, tokenizer
        self.want_logprobs = want_logprobs
        self.tool_calls = tool_calls  # reads the output for calls (chat with tools)
        self.text = ""
        self.logprobs: list[dict] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self._token_text_len = 0  # completions' text_offset counts token strings

    def opening_delta(self) -> dict:
        """Chat streams open each choice with the assistant role."""
        return {"index": self.index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}

    def add(self, out: dict) -> dict | None:
        """Record a backend output; return its streaming choice object, or
        None when it carries nothing to send (text held back by the
        detokenizer or a possible stop string)."""
        text, lps = out["text"], out.get("logprobs") or []
        self.text += text
        self.logprobs += lps
        if out["finished"]:
            self.finish_reason = out["finish_reason"]
        self.prompt_tokens = out["prompt_tokens"]
        self.completion_tokens = out["completion_tokens"]
        self.cached_tokens = out["cached_tokens"]
        delta: dict[str, Any] = {"content": text} if text else {}
        if self.tool_calls is not None:
            delta = self._tool_delta(text, out["finished"])
        if not delta and not out["finished"] and not (self.want_logprobs and lps):
            return None
        lp_obj = self._logprobs(lps) if self.want_logprobs else None
        if self.kind == "completion":
            return {"index": self.index, "text": text, "logprobs": lp_obj,
                    "finish_reason": self.finish_reason}
        return {"index": self.index, "delta": delta, "logprobs": lp_obj,
                "finish_reason": self.finish_reason}

    def _tool_delta(self, text: str, finished: bool) -> dict[str, Any]:
        content, calls, self.finish_reason = self.tool_calls.step(text, finished, self.finish_reason)
        delta: dict[str, Any] = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _logprobs(self, lps: list[dict]) -> dict:
        if self.kind == "chat":
            return chat_logprobs(self.tokenizer, lps)
        obj = completion_logprobs(self.tokenizer, lps, self._token_text_len)
        self._token_text_len += sum(len(t) for t in obj["tokens"])
        return obj

    def final(self) -> dict:
        """The choice of a non-streaming response."""
        lp_obj = None
        if self.want_logprobs:
            lp_obj = (chat_logprobs(self.tokenizer, self.logprobs) if self.kind == "chat"
                      else completion_logprobs(self.tokenizer, self.logprobs, 0))
        if self.kind == "completion":
            return {"index": self.index, "text": self.text, "logprobs": lp_obj,
                    "finish_reason": self.finish_reason}
        message = {"role": "assistant", "content": self.text}
        if self.tool_calls is not None:
            message = self.tool_calls.message()
        return {"index": self.index, "message": message, "logprobs": lp_obj,
                "finish_reason": self.finish_reason}
