"""Tool (function) calling for the chat API.

Request side: ``tools`` and ``tool_choice`` are checked here (each error
names its field), the tools reach the chat template, and assistant
messages' ``tool_calls`` are given to the template with their arguments as
objects (templates write them with ``tojson``).

Output side, by ``tool_choice``:

- ``none``: the tools are in the prompt; the output is plain content.
- a named function: the output is constrained (splitserve.engine.structured) to that
  function's ``parameters`` schema; the whole output is the call's
  arguments, streamed as argument deltas. finish_reason stays ``stop``.
- ``required``: the output is constrained to a JSON array of one or more
  ``{"name", "arguments"}`` objects (exactly one when parallel_tool_calls
  is false); the calls are sent when the output ends.
- ``auto`` (the default with tools): the model writes freely; its output
  is parsed with the tool-call format of the model's chat template
  (``ToolParser``): Hermes ``<tool_call>{...}</tool_call>`` (Qwen 2.5/3,
  Hermes, and the fallback), Mistral ``[TOOL_CALLS]``, Llama 3 JSON. Text
  before the first call is content; once a call begins, the rest is held
  and parsed when the output ends. Output that does not parse is returned
  as content, whole.

A choice that made calls ends with finish_reason ``tool_calls`` (unless cut
by ``length``).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from typing import Any

from splitserve.cluster.api.openai_structured import OPENAI_NAME, check_constraint, check_json_schema
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import MAX_JSON_DEPTH, MAX_TOOLS, nesting_exceeds
from splitserve.engine.sampling_params import SamplingParams
# OpenAI's message roles, each as the chat template receives it: "developer"
# (what OpenAI's clients send for instructions) becomes "system", as OpenAI
# does for models without a developer role.
TEMPLATE_ROLES = {"system": "system", "developer": "system", "user": "user",
                  "assistant": "assistant", "tool": "tool"}
_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# What parsing a model's output may raise: the output is then plain content.
_BAD_OUTPUT = (ValueError, TypeError, KeyError, AttributeError, RecursionError)


def _fail(message: str, param: str) -> None:
    raise InvalidRequestError(message, param=param)


# -- the output formats --------------------------------------------------------

@dataclass(frozen=True)
class ToolParser:
    """A model family's way of writing tool calls in its output."""

    name: str
    markers: tuple[str, ...]  # text that begins the calls
    at_start_only: bool = False  # a marker counts only at the start of the output
    needs_special_tokens: bool = False  # the marker is a special token

    def extract(self, text: str) -> list[tuple[str, str]] | None:
        """The calls in ``text`` as [(name, arguments JSON)], or None when it
        holds no well-formed calls."""
        start = self.find(text)
        if start is None:
            return None
        try:
            return _PARSE[self.name](text[start:]) or None
        except _BAD_OUTPUT:
            return None

    def find(self, text: str) -> int | None:
        if self.at_start_only:
            stripped = text.lstrip()
            return len(text) - len(stripped) if stripped.startswith(self.markers) else None
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def may_begin(self, tail: str) -> bool:
        """Whether ``tail`` (the end of the text so far) could be the start
        of a marker still arriving."""
        return any(m.startswith(tail) for m in self.markers)


def _call(obj: Any, args_key: str = "arguments") -> tuple[str, str]:
    name = obj["name"]
    args = obj[args_key] if args_key in obj else obj.get("parameters", obj.get("arguments"))
    if not isinstance(name, str) or not name:
        raise ValueError("no function name")
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError("arguments must be an object")
    return name, json.dumps(args, ensure_ascii=False)


def _parse_hermes(text: str) -> list[tuple[str, str]]:
    calls = []
    blocks = text.split("<tool_call>")[1:]
    for k, block in enumerate(blocks):
        body, closed, rest = block.partition("</tool_call>")
        if rest.strip() or not (closed or k == len(blocks) - 1):
            raise ValueError("text after a tool call, or an unclosed call before another")
        calls.append(_call(json.loads(body)))
    return calls


def _json_values(text: str, separators: str) -> list[Any]:
    """The JSON values written one after another in ``text``, separated by
    whitespace or any of ``separators``."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in separators):
            i += 1
        if i == len(text):
            return values
        value, i = decoder.raw_decode(text, i)
        values.append(value)


def _parse_llama3(text: str) -> list[tuple[str, str]]:
    text = text.lstrip().removeprefix("<|python_tag|>")
    return [_call(obj, "parameters") for obj in _json_values(text, ";")]


def _parse_mistral(text: str) -> list[tuple[str, str]]:
    calls = []
    for part in text.split("[TOOL_CALLS]")[1:]:
        part = part.strip()
        if part.startswith("["):  # [{"name": ..., "arguments": {...}}, ...]
            (array,) = _json_values(part, "")
            calls += [_call(obj) for obj in array]
        else:  # name[ARGS]{...}
            name, sep, args = part.partition("[ARGS]")
            if not sep:
                raise ValueError("no [ARGS]")
            calls.append(_call({"name": name.strip(), "arguments": json.loads(args)}))
    return calls


_PARSE = {"hermes": _parse_hermes, "llama3_json": _parse_llama3, "mistral": _parse_mistral}
HERMES = ToolParser("hermes", ("<tool_call>",))
MISTRAL = ToolParser("mistral", ("[TOOL_CALLS]",), needs_special_tokens=True)
LLAMA3_JSON = ToolParser("llama3_json", ("<|python_tag|>", "{"), at_start_only=True,
                         needs_special_tokens=True)


PARSERS = {p.name: p for p in (HERMES, MISTRAL, LLAMA3_JSON)}
PARSER_NAMES = ("auto", *PARSERS)  # a model's tool_call_parser setting


def parser_for(chat_template: str | None, name: str = "auto") -> ToolParser:
    """The tool-call format a chat template teaches its model, or the one
    ``name``d (a model's ``tool_call_parser`` setting; auto: detected)."""
    if name != "auto":
        return PARSERS[name]
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return MISTRAL
    if "<tool_call>" not in t and ("<|python_tag|>" in t or "<|eom_id|>" in t):
        return LLAMA3_JSON
    return HERMES


# -- the request ---------------------------------------------------------------

@dataclass
class ToolRequest:
    tools: list[dict[str, Any]]  # as the chat template receives them
    parameters: dict[str, dict[str, Any]]  # function name -> its JSON schema
    choice: str  # none | auto | required | named
    named: str | None
    parallel: bool
    parser: ToolParser
    constraint: dict[str, str] | None = None
    constraint_param: str | None = None  # the field the constraint comes from, for errors

    def calls(self) -> "ToolCalls | None":
        return None if self.choice == "none" else ToolCalls(self)

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """The request's sampling with its tools: a forced call constrains
        the output; a format whose markers are special tokens keeps them."""
        if self.constraint is not None:
            if params.structured_output is not None:
                raise InvalidRequestError(
                    "a forced tool call (required or a named function) cannot be combined with "
                    "a structured output format", param="tool_choice")
            return dataclasses.replace(params, structured_output=self.constraint)
        if self.choice == "auto" and self.parser.needs_special_tokens:
            return dataclasses.replace(params, skip_special_tokens=False)
        return params


def _check_tool(i: int, tool: Any) -> tuple[str, dict[str, Any]]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
        _fail(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
    fn = tool.get("function")
    if not isinstance(fn, dict):
        _fail(f"{where}.function must be an object", f"{where}.function")
    unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if unknown:
        _fail(f"{where}.function: unknown fields {unknown}"[:200], f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not OPENAI_NAME.fullmatch(name):
        _fail(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'",
              f"{where}.function.name")
    if not isinstance(fn.get("description", ""), str):
        _fail(f"{where}.function.description must be a string", f"{where}.function.description")
    if not isinstance(fn.get("strict", False), bool):
        _fail(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
    params = fn.get("parameters", _EMPTY_PARAMETERS)
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        _fail(f"{where}.function.parameters must be a JSON schema of an object",
              f"{where}.function.parameters")
    # whatever tool_choice (a forced call compiles it too): not shown to the model unless a schema
    check_json_schema(params, f"{where}.function.parameters")
    return name, params


def _choice(tool_choice: Any, names: dict[str, int]) -> tuple[str, str | None]:
    if tool_choice is None:
        return ("auto" if names else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            _fail(f"tool_choice must be none, auto, required or a function, got {tool_choice[:40]!r}",
                  "tool_choice")
        if tool_choice != "none" and not names:
            _fail(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        return tool_choice, None
    fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or set(tool_choice) - {"type", "function"}:
        _fail('tool_choice must be {"type": "function", "function": {"name": ...}}', "tool_choice")
    if name not in names:
        _fail(f"tool_choice names {name[:64]!r}, which is not among the tools", "tool_choice")
    return "named", name


def _required_schema(parameters: dict[str, dict], parallel: bool) -> dict[str, Any]:
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, schema in parameters.items()]
    array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        array["maxItems"] = 1
    return array


def tool_request(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None,
                 chat_template: str | None, parser: str = "auto") -> ToolRequest | None:
    """The request's tool calling, checked; None when it has neither tools
    nor a tool_choice. ``parser``: the model's tool-call format (auto:
    detected from ``chat_template``)."""
    if tools is None and tool_choice in (None, "none"):
        return None
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        _fail(f"at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    names: dict[str, int] = {}
    parameters: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        name, params = _check_tool(i, tool)
        if name in names:
            _fail(f"tools[{i}] repeats the function name {name!r}", f"tools[{i}].function.name")
        names[name], parameters[name] = i, params
    choice, named = _choice(tool_choice, names)
    req = ToolRequest(tools, parameters, choice, named, parallel_tool_calls is not False,
                      parser_for(chat_template, parser))
    if choice == "named":
        req.constraint_param = f"tools[{names[named]}].function.parameters"
        req.constraint = _checked_json(parameters[named], req.constraint_param)
    elif choice == "required":
        for name, i in names.items():
            _checked_json(parameters[name], f"tools[{i}].function.parameters")
        req.constraint_param = "tools"
        req.constraint = _checked_json(_required_schema(parameters, req.parallel), "tools")
    return req


def _checked_json(schema: dict[str, Any], param: str) -> dict[str, str]:
    spec = {"type": "json", "value": json.dumps(schema)}
    check_constraint(spec, param)
    return spec


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for the chat template: each role one of OpenAI's
    (``TEMPLATE_ROLES``, developer given as system), assistant ``tool_calls``
    checked, with each call's JSON ``arguments`` string given as an object; a
    ``tool`` message names the call it answers (``tool_call_id``, as OpenAI
    requires: without it a template cannot tie the result to its call)."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if not isinstance(role, str) or role not in TEMPLATE_ROLES:
            _fail(f"messages[{i}].role must be system, developer, user, assistant or tool, got "
                  f"{str(role)[:40]!r}", f"messages[{i}].role")
        if TEMPLATE_ROLES[role] != role:
            m = {**m, "role": TEMPLATE_ROLES[role]}
        if m.get("role") == "tool" and not m.get("tool_call_id"):
            _fail(f"messages[{i}]: a tool message needs the tool_call_id of the call it answers",
                  f"messages[{i}].tool_call_id")
        calls = m.get("tool_calls")
        if calls is not None:
            if m.get("role") != "assistant":
                _fail(f"messages[{i}]: only assistant messages have tool_calls", f"messages[{i}].tool_calls")
            m = {**m, "tool_calls": [_template_call(i, j, c) for j, c in enumerate(calls)]}
        out.append(m)
    return out


def _template_call(i: int, j: int, call: dict[str, Any]) -> dict[str, Any]:
    where = f"messages[{i}].tool_calls[{j}]"
    if call.get("type", "function") != "function":
        _fail(f'{where}.type must be "function"', f"{where}.type")
    if not isinstance(call.get("id", ""), str):
        _fail(f"{where}.id must be a string", f"{where}.id")
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        _fail(f'{where} must have "function": {{"name", "arguments"}} (a non-empty name)', where)
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            _fail(f"{where}.function.arguments is not valid JSON", f"{where}.function.arguments")
    if nesting_exceeds(args, MAX_JSON_DEPTH):  # the template writes it back out, recursively
        _fail(f"{where}.function.arguments nests more than {MAX_JSON_DEPTH} levels deep",
              f"{where}.function.arguments")
    if not isinstance(args, dict):
        _fail(f"{where}.function.arguments must be a JSON object", f"{where}.function.arguments")
    return {**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}}


# -- one choice's output -------------------------------------------------------

def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCalls:
    """One choice's output read for tool calls. ``feed`` takes each text
    delta and returns (content delta, tool_calls deltas) to stream now;
    ``finish`` returns what the end of the output releases."""

    def __init__(self, req: ToolRequest):
        self.req = req
        self.text = ""  # all output so far
        self.sent = 0  # output text decided (sent as content, or taken by calls)
        self.capturing = req.choice != "auto"
        self.calls: list[dict[str, Any]] = []

    def step(self, text: str, finished: bool, reason: str | None) -> tuple[str, list[dict], str | None]:
        """One output delta: (content, tool_calls deltas, finish reason)."""
        content, calls = self.feed(text)
        if finished:
            more, calls_at_end = self.finish()
            content, calls, reason = content + more, calls + calls_at_end, self.finish_reason(reason)
        return content, calls, reason

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.text += text
        if self.req.choice == "named":
            return "", self._named_delta(text)
        if self.capturing:
            return "", []
        parser = self.req.parser
        start = parser.find(self.text)
        if start is not None:
            self.capturing = True
            return self._content_to(start), []
        hold = 0
        if parser.at_start_only:  # the whole output so far may still turn into a call
            head = self.text.lstrip()
            hold = len(self.text) if not head or parser.may_begin(head) else 0
        else:
            for k in range(min(len(self.text), max(map(len, parser.markers)) - 1), 0, -1):
                if parser.may_begin(self.text[-k:]):
                    hold = k
                    break
        return self._content_to(len(self.text) - hold), []

    def _content_to(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _named_delta(self, text: str) -> list[dict]:
        if not self.calls:
            self.calls.append({"id": _call_id(), "type": "function",
                               "function": {"name": self.req.named, "arguments": ""}})
            return [{"index": 0, **self.calls[0], "function": {"name": self.req.named, "arguments": text}}]
        return [{"index": 0, "function": {"arguments": text}}] if text else []

    def finish(self) -> tuple[str, list[dict]]:
        if self.req.choice == "named":
            if self.calls:
                self.calls[0]["function"]["arguments"] = self.text
                return "", []
            return "", self._named_delta("")
        calls = self._parse() if self.capturing else None
        if calls is None:  # plain content: release what was held
            return self._content_to(len(self.text)), []
        if not self.req.parallel:
            calls = calls[:1]
        self.calls = [{"id": _call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                      for n, a in calls]
        return "", [{"index": k, **c} for k, c in enumerate(self.calls)]

    def _parse(self) -> list[tuple[str, str]] | None:
        if self.req.choice == "required":
            try:
                (array,) = _json_values(self.text, "")
                return [_call(obj) for obj in array] or None
            except _BAD_OUTPUT:
                return None
        return self.req.parser.extract(self.text)

    def finish_reason(self, reason: str | None) -> str | None:
        if reason == "stop" and self.calls and self.req.choice != "named":
            return "tool_calls"
        return reason

    def message(self) -> dict[str, Any]:
        """The assistant message of the whole output (after ``finish``)."""
        if not self.calls:
            return {"role": "assistant", "content": self.text}
        content = self.text[:self.sent] if self.req.choice == "auto" else ""
        return {"role": "assistant", "content": content if content.strip() else None,
                "tool_calls": self.calls}
