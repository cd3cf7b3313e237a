"""The OpenAI API's wire format: request bodies (read and parsed by
cluster/api/http_body.py) and errors (responses: cluster/api/openai_response.py).

Requests are validated strictly (a string where a number belongs is a 400,
not a coercion) and unknown fields are refused, as OpenAI does. Fields the
API defines but splitserve does not implement are accepted only at their
"off" value, and otherwise refused naming the field, so that no request is
silently served differently from what it asked for.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse

from splitserve.cluster.api.chat_prompt import ChatRequest
from splitserve.cluster.api.openai_structured import structured_output
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import MAX_CHOICES, MAX_PROMPTS, PROMPT_CHARS_PER_TOKEN
from splitserve.engine.sampling_params import SamplingParams

# OpenAI's default for /v1/completions; chat completions default to no limit.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
ERROR_MESSAGE_CHARS = 1024  # error bodies stay small whatever the request echoed
# a \uXXXX escape of a UTF-16 surrogate: JSON's way to write a lone one
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(text: str) -> str:
    """``text`` encodable as UTF-8: a lone surrogate (a request's "\\ud800"
    echoed back) becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


class ApiError(Exception):
    """An HTTP error in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        message = _unicode(self.message)
        if len(message) > ERROR_MESSAGE_CHARS:
            message = message[: ERROR_MESSAGE_CHARS - 3] + "..."
        param = _unicode(self.param[:200]) if self.param else self.param
        return {"error": {"message": message, "type": self.type, "param": param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class RequestBody(BaseModel):
    """Every request body of the HTTP API: strict types, unknown fields refused,
    and the field policy tables docs/api.md lists."""

    model_config = ConfigDict(strict=True, extra="forbid")

    # Fields refused whatever their value (unless null): name -> why, or what to send instead.
    REFUSED: ClassVar[dict[str, str]] = {}
    # Fields accepted only at one value: name -> (that value, why).
    ONLY: ClassVar[dict[str, tuple[Any, str]]] = {}
    # Fields accepted (their type checked) and ignored; listed in docs/api.md.
    IGNORED: ClassVar[tuple[str, ...]] = ()

    def check_supported(self) -> None:
        for name in type(self).model_fields:
            if _past_int64(getattr(self, name)):
                raise InvalidRequestError(
                    f"{name}: an integer does not fit in 64 bits (-2**63 to 2**63 - 1)", param=name)
        for name, (allowed, why) in self.ONLY.items():
            value = getattr(self, name)
            if value is not None and value != allowed:
                raise InvalidRequestError(f"{name} {_short(value)} is not supported: {why}",
                                          param=name)


def renamed(e: InvalidRequestError, rename: dict[str, str]) -> InvalidRequestError:
    """``e`` naming the field the client wrote (``rename``: the engine's
    name -> this API's) in its param and in its message."""
    field = rename.get(e.param) if e.param else None
    if field is None or field == e.param:
        return e
    return InvalidRequestError(re.sub(rf"\b{re.escape(e.param)}\b", field, str(e)), field)


def _past_int64(value: Any) -> bool:
    """An integer field (or a list of them, or of lists: token ids) holds one
    outside int64: the cluster's typed messages (msgspec) cannot carry it."""
    if isinstance(value, list):
        return any(_past_int64(v) for v in value if isinstance(v, (int, list)))
    return isinstance(value, int) and not -2**63 <= value < 2**63


def _short(value: Any) -> str:
    return json.dumps(value)[:60]


class StreamOptions(RequestBody):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted for vLLM clients; usage comes at the end


_NULLABLE_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                      "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids")
_STRUCTURED = "send structured_outputs: {json | regex | choice | grammar: ...} (vLLM's current name)"


class Sampling(RequestBody):
    """What every generation endpoint takes (completions, chat, Responses):
    the sampling parameters, vLLM's extensions among them, and the fields
    other servers accept that splitserve accepts, ignores or refuses."""

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
    stream: bool | None = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    # vLLM's extension: exactly one of json (schema), regex, grammar (Lark), choice
    structured_outputs: dict[str, Any] | None = None
    # splitserve's extension: false opts this request out of speculative decoding
    speculative: bool = True
    # vLLM's: the request's place in its model's router queue, lower first
    # (cluster/api/request_options.py)
    priority: int | None = None
    # Accepted and ignored: they concern OpenAI's hosted service, or beam search.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    request_id: str | None = None  # the server assigns ids (x-splitserve-request-id)
    length_penalty: float | None = None
    # vLLM fields accepted at their default only
    use_beam_search: bool | None = None
    spaces_between_special_tokens: bool | None = None
    return_tokens_as_token_ids: bool | None = None

    IGNORED: ClassVar[tuple[str, ...]] = (
        "user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
        "request_id", "length_penalty")
    ONLY: ClassVar[dict[str, tuple[Any, str]]] = {
        "use_beam_search": (False, "beam search is not available; sample n choices instead"),
        "spaces_between_special_tokens": (True, "special tokens are always decoded this way"),
        "return_tokens_as_token_ids": (False, "tokens are returned as text"),
    }
    REFUSED: ClassVar[dict[str, str]] = {
        "truncate_prompt_tokens": "prompts are never truncated; shorten the prompt",
        "allowed_token_ids": "restrict tokens with logit_bias or structured_outputs",
        "bad_words": "ban tokens with logit_bias",
        "logits_processors": "custom logits processors cannot be loaded per request",
        "cache_salt": "the prefix cache cannot be salted per request",
        "kv_transfer_params": "the cluster moves KV caches between its own replicas",
        "vllm_xargs": "there are no engine plugins to pass them to",
        "mm_processor_kwargs": "only text input is served",
        "prompt_logprobs": "score a prompt on /v1/completions with echo and logprobs",
        **{f"guided_{k}": _STRUCTURED for k in ("json", "regex", "choice", "grammar",
                                                "json_object", "decoding_backend",
                                                "whitespace_pattern")},
    }

    def sampling(self, max_tokens: int | None, logprobs: int | None, n: int = 1,
                 structured: dict[str, str] | None = None) -> SamplingParams:
        """Fields left unset (or null) take SamplingParams' defaults. Not
        validated here: the backend validates (and knows the context length)."""
        given = {name: getattr(self, name) for name in _NULLABLE_SAMPLING
                 if getattr(self, name) is not None}
        return SamplingParams(
            max_tokens=max_tokens, logprobs=logprobs, n=n, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=_token_keys(self.logit_bias or {}), structured_output=structured,
            speculative=self.speculative, **given)


class _Common(Sampling):
    """Completions and chat."""

    n: int | None = None
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true",
                                      param="stream_options")

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return self.sampling(max_tokens, logprobs, self.num_choices,
                             structured_output(self.response_format, self.structured_outputs))


# a token id as OpenAI writes a logit_bias key: ASCII decimal digits, no sign,
# space or leading zero (int() would also read " 5", "+5", "05", "5_0" and
# other scripts' digits, so two keys could name one token, the last one winning)
_TOKEN_KEY = re.compile(r"0|[1-9][0-9]{0,39}")


def _token_keys(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as JSON strings."""
    out = {}
    for key, value in bias.items():
        if not _TOKEN_KEY.fullmatch(key):
            raise InvalidRequestError(
                f"logit_bias keys must be token ids in decimal digits (at most 40), got {key[:40]!r}",
                param="logit_bias")
        out[int(key)] = value
    return out


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True  # vLLM's: text prompts get the tokenizer's BOS

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError(
                "max_tokens must be at least 1 (0 is allowed with echo, to score the prompt)",
                param="max_tokens")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise InvalidRequestError("best_of other than n is not supported", param="best_of")

    def completion_params(self) -> SamplingParams:
        """Echo with logprobs scores the prompt too. max_tokens 0 (with echo)
        generates nothing: the engine samples one token, which the response
        leaves out (``Echo.score_only``)."""
        params = self.sampling_params(1 if self.max_tokens == 0 else self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=self.logprobs)
        return params

    def prompt_inputs(self) -> list[str | list[int]]:
        """The request's prompts, each text or token ids: a list of strings
        or of token-id lists is a batch, answered with ``n`` choices per
        prompt (choice index = prompt index * n + i)."""
        p = self.prompt
        batch = list(p) if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
        if len(batch) > MAX_PROMPTS:
            raise InvalidRequestError(
                f"a request takes at most {MAX_PROMPTS} prompts, got {len(batch)}", param="prompt")
        if len(batch) * self.num_choices > MAX_CHOICES:
            raise InvalidRequestError(
                f"{len(batch)} prompts x n={self.num_choices} is more than {MAX_CHOICES} choices "
                f"in one request", param="prompt" if len(batch) > 1 else "n")
        for q in batch:
            if isinstance(q, str) and not q:
                raise InvalidRequestError("the prompt is empty", param="prompt")
        return batch


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(RequestBody):
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
        if content is None and self.role != "assistant":  # as OpenAI: only an assistant's may be null
            raise InvalidRequestError(f"messages[{index}].content is required for a {self.role[:40]!r} message",
                                      param=f"messages[{index}].content")
        if isinstance(content, list):
            if not content:  # as OpenAI
                raise InvalidRequestError(f"messages[{index}].content must not be an empty list",
                                          param=f"messages[{index}].content")
            texts = []
            for k, part in enumerate(content):
                if part.type != "text":
                    raise InvalidRequestError(
                        f"messages[{index}].content: only text parts are supported, got a "
                        f"{part.type[:40]!r} part", param=f"messages[{index}].content")
                if part.text is None:
                    raise InvalidRequestError(
                        f"messages[{index}].content[{k}].text must be a string",
                        param=f"messages[{index}].content[{k}].text")
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
    include_reasoning: bool = True  # vLLM's: false leaves reasoning_content out
    add_special_tokens: bool = False  # vLLM's: the template writes BOS
    # Accepted and ignored: thinking is switched with chat_template_kwargs
    # (e.g. enable_thinking), which is where the model's template reads it.
    reasoning_effort: str | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    continue_final_message: bool | None = None
    echo: bool | None = None

    IGNORED: ClassVar[tuple[str, ...]] = (*Sampling.IGNORED, "reasoning_effort", "verbosity")
    ONLY: ClassVar[dict[str, tuple[Any, str]]] = {
        **Sampling.ONLY,
        "modalities": (["text"], "only text output is served"),
        "continue_final_message": (False, "the assistant's reply always starts a new message"),
        "echo": (False, "a chat response holds only the new message"),
    }
    REFUSED: ClassVar[dict[str, str]] = {
        **Sampling.REFUSED,
        "functions": "send tools",
        "function_call": "send tool_choice",
        "audio": "only text output is served",
        "prediction": "predicted outputs are not supported",
        "web_search_options": "there is no built-in web search",
        "documents": "put documents in the messages",
        "chat_template": "the chat template is the model's (its chat_template setting)",
    }

    def chat_request(self, kwargs: dict[str, Any]) -> ChatRequest:
        return ChatRequest(
            self.model, self.template_messages(),
            self.sampling_params(self.output_limit, self.logprobs_count), self.tools,
            self.tool_choice, self.parallel_tool_calls, kwargs, self.add_generation_prompt,
            self.include_reasoning, self.add_special_tokens)

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

    def text_chars(self) -> int:
        """Characters of the messages' text (``messages_text_chars``): what
        the prompt's length in tokens follows."""
        return messages_text_chars(self.messages)


def messages_text_chars(messages: list[ChatMessage]) -> int:
    """Characters of the messages' text (contents, roles, names,
    tool_call_ids, tool calls' ids, names and arguments), and one token's
    worth per message (its role's marker), so that many empty messages are
    bounded as well as long ones. Tools and ``chat_template_kwargs`` are
    added by chat_prompt's ``check_chat_chars``."""
    total = 0
    for m in messages:
        total += PROMPT_CHARS_PER_TOKEN + len(m.role) + len(m.name or "") + len(m.tool_call_id or "")
        parts = m.content if isinstance(m.content, list) else [m.content]
        total += sum(len(p if isinstance(p, str) else p.text or "") for p in parts if p is not None)
        for call in m.tool_calls or ():
            fn = call.get("function")
            fn = fn if isinstance(fn, dict) else {}
            args = fn.get("arguments")
            if isinstance(args, dict):  # accepted as an object too; the template writes it out
                args = json.dumps(args)
            total += sum(len(v) for v in (call.get("id"), fn.get("name"), args) if isinstance(v, str))
    return total
