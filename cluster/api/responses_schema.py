"""The Responses API's request body (``POST /v1/responses``) and what it
becomes for the chat machinery: ``instructions`` and ``input`` items as
chat messages, function tools and ``tool_choice`` in chat's shapes,
``text.format`` as a structured output. Each error names the Responses
field (``input[2].content``, ``tools[0].name``)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from splitserve.cluster.api.chat_prompt import ChatRequest, template_kwargs
from splitserve.cluster.api.openai_schema import ApiError, Sampling, renamed
from splitserve.cluster.api.openai_structured import (check_constraint, check_schema_fields,
                                                      structured_output)
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import MAX_JSON_DEPTH, PROMPT_CHARS_PER_TOKEN, nesting_exceeds
from splitserve.engine.structured import json_object_spec

_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = {"input_text", "output_text", "text"}
_STATELESS = ("responses are not stored here: send the whole conversation in input (with the "
              "previous output items)")


# The fields OpenAI defines for each input item type (an output item sent back
# as input carries id and status; phase, caller, namespace describe earlier
# turns and change nothing here). Any other is refused, as on chat's messages:
# a misspelt field must not be dropped silently.
_ITEM_FIELDS = {
    "message": {"type", "role", "content", "id", "status", "phase"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status", "caller", "namespace"},
    "function_call_output": {"type", "call_id", "output", "id", "status", "caller", "name",
                             "namespace"},
    "reasoning": {"type", "id", "summary", "content", "encrypted_content", "status"},
}
# OpenAI's ``include`` values: output this server does not produce, so
# accepted and ignored, except logprobs (refused: served by chat completions).
_INCLUDE = ("file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
            "message.input_image.image_url", "computer_call_output.output.image_url",
            "code_interpreter_call.outputs", "reasoning.encrypted_content",
            "message.output_text.logprobs")


# text.format's fields by its type (OpenAI's)
_FORMAT_FIELDS = {"text": {"type"}, "json_object": {"type"},
                  "json_schema": {"type", "name", "schema", "strict", "description"}}


def _fail(message: str, param: str) -> None:
    raise InvalidRequestError(message, param=param)


def _string(item: dict, key: str, where: str, empty: bool = True) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not (empty or value):
        _fail(f"{where}.{key} must be a {'' if empty else 'non-empty '}string", f"{where}.{key}")
    return value


def _text(content: Any, where: str, field: str = "content") -> str:
    """A message's content (a function_call_output's ``output``): a string,
    or text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:  # as OpenAI: an empty list is refused
        _fail(f"{where}.{field} must be a string or a non-empty list of text parts",
              f"{where}.{field}")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        # a type that is no string (a list, an object) cannot be looked up in a set
        if not isinstance(kind, str) or kind not in _TEXT_PARTS:
            _fail(f"{where}.{field}[{k}]: only text parts are supported, got "
                  f"{str(kind)[:40]!r}", f"{where}.{field}")
        if not isinstance(part.get("text"), str):
            _fail(f"{where}.{field}[{k}].text must be a string", f"{where}.{field}")
        texts.append(part["text"])
    return "\n".join(texts)


def _arguments(item: dict, where: str) -> str:
    """A function_call's ``arguments``: JSON text of an object, checked here
    so that an error names the input item, not the chat message it becomes."""
    text = _string(item, "arguments", where)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        _fail(f"{where}.arguments is not valid JSON", f"{where}.arguments")
    if nesting_exceeds(value, MAX_JSON_DEPTH):
        _fail(f"{where}.arguments nests more than {MAX_JSON_DEPTH} levels deep", f"{where}.arguments")
    if not isinstance(value, dict):
        _fail(f"{where}.arguments must be a JSON object", f"{where}.arguments")
    return text


def _input_messages(items: list[Any]) -> list[dict[str, Any]]:
    """Input items as chat messages: a function_call joins the assistant
    message before it (or starts one), a function_call_output is a tool
    message, a reasoning item is dropped (templates leave past reasoning out)."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            _fail(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in _ROLES:
                _fail(f"{where}.role must be user, system, developer or assistant", f"{where}.role")
            messages.append({"role": _ROLES[role], "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where, empty=False),
                                 "arguments": _arguments(item, where)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where, empty=False)
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _text(item.get("output"), where, "output")})
        elif kind != "reasoning":
            _fail(f"{where}: input items of type {str(kind)[:40]!r} are not supported (message, "
                  "function_call, function_call_output, reasoning)", f"{where}.type")
    return messages


def _check_items(items: list[Any]) -> None:
    """A field OpenAI does not define on an input item is a 400 naming it
    (``input[2].foo``); items of a type not served are refused by
    ``_input_messages``."""
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        allowed = _ITEM_FIELDS.get(kind) if isinstance(kind, str) else None
        unknown = sorted(set(item) - allowed) if allowed is not None else []
        if unknown:
            raise ApiError(400, f"input[{i}]: unknown field {unknown[0][:100]!r} on a {kind} item",
                           param=f"input[{i}].{unknown[0]}", code="unknown_parameter")


def _check_include(include: list[str]) -> None:
    for k, value in enumerate(include):
        if value not in _INCLUDE:
            raise ApiError(400, f"include[{k}]: {value[:100]!r} is not an include value (one of "
                           f"{', '.join(_INCLUDE)})", param=f"include[{k}]", code="invalid_value")
    if "message.output_text.logprobs" in include:
        _fail("include message.output_text.logprobs is not supported: logprobs are served by "
              "/v1/chat/completions", "include")


def _check_fields(obj: dict[str, Any] | None, where: str, types: dict[str, type | None]) -> None:
    """``obj``'s fields are among ``types``, each of its type unless null
    (a type of None: checked elsewhere)."""
    if obj is None:
        return
    unknown = sorted(set(obj) - set(types))
    if unknown:
        _fail(f"{where}: unknown fields {unknown}"[:200], where)
    for key, kind in types.items():
        if kind is not None and obj.get(key) is not None and not isinstance(obj[key], kind):
            what = {str: "a string", bool: "a boolean"}[kind]
            _fail(f"{where}.{key} must be {what}", f"{where}.{key}")


def _chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Function tools in chat's shape; other tool types are refused."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            _fail(f"tools[{i}]: only function tools are supported, got {str(kind)[:40]!r}",
                  f"tools[{i}].type")
        fn = {k: v for k, v in tool.items() if k != "type"}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if (choice.get("type") == "function" and set(choice) == {"type", "name"}
            and isinstance(choice["name"], str)):
        return {"type": "function", "function": {"name": choice["name"]}}
    _fail('tool_choice must be none, auto, required or {"type": "function", "name": ...}',
          "tool_choice")


def _responses_fields(e: InvalidRequestError) -> InvalidRequestError:
    """An error of the chat machinery naming this API's fields: a Responses
    tool has no "function" level."""
    param = (e.param or "").replace(".function", "")
    return InvalidRequestError(str(e).replace(".function", ""), param=param or None)


def text_format(text: dict[str, Any] | None) -> dict[str, str] | None:
    """``text.format`` as the engine's constraint (splitserve.engine.structured)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    unknown = set(fmt) - _FORMAT_FIELDS.get(kind, set()) if isinstance(kind, str) else set()
    if unknown:  # as on chat's response_format: a misspelt field must not be dropped
        _fail(f"text.format: unknown fields {sorted(unknown)} for type {kind[:40]!r}"[:200],
              "text.format")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_spec()
    if kind != "json_schema" or not isinstance(fmt.get("schema"), dict):
        _fail('text.format must be {"type": "text"}, {"type": "json_object"} or {"type": '
              '"json_schema", "name", "schema": {...}}', "text.format")
    check_schema_fields(fmt, "text.format")
    spec = {"type": "json", "value": json.dumps(fmt["schema"])}
    check_constraint(spec, "text.format")
    return spec


class ResponsesRequest(Sampling):
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Accepted and ignored: reasoning effort and summaries (thinking is
    # switched with chat_template_kwargs), extra output (include: OpenAI's
    # values only, _INCLUDE), limits of
    # built-in tools, cache retention.
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    max_tool_calls: int | None = None
    prompt_cache_retention: str | None = None
    stream_options: dict[str, Any] | None = None  # with stream only; obfuscation is not done
    # accepted at their default only
    background: bool | None = None
    truncation: str | None = None
    top_logprobs: int | None = None

    IGNORED: ClassVar[tuple[str, ...]] = (
        *Sampling.IGNORED, "reasoning", "include", "max_tool_calls", "prompt_cache_retention")
    ONLY: ClassVar[dict[str, tuple[Any, str]]] = {
        **Sampling.ONLY,
        "background": (False, "responses run while the request is open"),
        "truncation": ("disabled", "input that does not fit the context is refused"),
        "top_logprobs": (0, "logprobs are served by /v1/chat/completions"),
    }
    REFUSED: ClassVar[dict[str, str]] = {
        **Sampling.REFUSED,
        "previous_response_id": _STATELESS,
        "conversation": _STATELESS,
        "prompt": "stored prompt templates are not available; send instructions and input",
    }

    def check_supported(self) -> None:
        super().check_supported()
        _check_include(self.include or [])
        if isinstance(self.input, list):
            _check_items(self.input)
        # the fields accepted and ignored are type-checked all the same
        _check_fields(self.text, "text", {"format": None, "verbosity": str})
        _check_fields(self.reasoning, "reasoning",
                      {"effort": str, "summary": str, "generate_summary": str})
        _check_fields(self.stream_options, "stream_options", {"include_obfuscation": bool})
        if self.stream_options is not None and not self.stream:
            _fail("stream_options is only allowed when stream is true", "stream_options")
        if self.max_tool_calls is not None and self.max_tool_calls < 0:
            _fail(f"max_tool_calls must be >= 0, got {self.max_tool_calls}", "max_tool_calls")
        if isinstance(self.input, list) and not self.input:
            _fail("input must not be empty", "input")
        if self.text_format() is not None and self.structured_outputs is not None:
            _fail("set text.format or structured_outputs, not both", "structured_outputs")

    def text_format(self) -> dict[str, str] | None:
        return text_format(self.text)

    def messages(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*system, {"role": "user", "content": self.input}]
        return [*system, *_input_messages(self.input)]

    def text_chars(self) -> int:
        """Characters of the conversation's text, counted as chat's messages
        are (``messages_text_chars``): each message's role, content and
        ``tool_call_id``, its calls' ids, names and arguments, and one
        token's worth per message (its role's marker)."""
        total = 0
        for m in self.messages():
            total += PROMPT_CHARS_PER_TOKEN + len(m["role"]) + len(m.get("content") or "")
            total += len(m.get("tool_call_id") or "")
            total += sum(len(c["id"]) + len(c["function"]["name"]) + len(c["function"]["arguments"])
                         for c in m.get("tool_calls", ()))
        return total

    def chat_request(self) -> ChatRequest:
        structured = self.text_format()
        if structured is None:
            structured = structured_output(None, self.structured_outputs)
        return ChatRequest(
            self.model, self.messages(), self.sampling(self.max_output_tokens, None, 1, structured),
            _chat_tools(self.tools), _chat_tool_choice(self.tool_choice), self.parallel_tool_calls,
            template_kwargs(self.chat_template_kwargs))


def prepare_error(e: InvalidRequestError) -> InvalidRequestError:
    """An error of preparing the chat request, naming the Responses fields."""
    e = _responses_fields(e)
    rename = {"max_tokens": "max_output_tokens", "messages": "input"}
    return renamed(e, rename)
