"""A chat request made ready to run, for the HTTP chat and Responses
endpoints: the tools checked (splitserve.cluster.api.tool_calls), the chat
template rendered with them and the client's template variables, the
prompt tokenized, the sampling constrained for a forced tool call, the
reasoning split decided from the rendered prompt
(splitserve.cluster.api.reasoning), and the whole validated by the backend.
Runs on a preparation thread (splitserve.cluster.api.prepare)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from splitserve.cluster.api.backend import Backend
from splitserve.cluster.api.reasoning import Reasoning, reasoning_for
from splitserve.cluster.api.tool_calls import ToolRequest, template_messages, tool_request
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import check_prompt_chars
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tokenizer import SPECIAL_TOKEN_KEYS

# Template variables a client may not set through chat_template_kwargs: those
# the renderer sets (splitserve.engine.tokenizer.render_chat_template: the
# conversation, the special tokens, its helpers) and "self" (the renderer's
# own; it cannot be passed on). Setting one would rewrite the prompt's
# structure (a fake BOS, no generation prompt) or silence the template's checks.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", *SPECIAL_TOKEN_KEYS,
    "raise_exception", "strftime_now", "self"})


def template_kwargs(kwargs: Any, param: str = "chat_template_kwargs") -> dict[str, Any]:
    """The client's extra chat template variables (e.g. ``enable_thinking``),
    checked: a reserved or non-identifier name is a 400 naming ``param.<key>``."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InvalidRequestError(f"{param} must be an object", param=param)
    bad = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS or not k.isidentifier())
    if bad:
        key = bad[0][:50]
        why = "is set by the server" if key in RESERVED_TEMPLATE_KWARGS else "is not a variable name"
        raise InvalidRequestError(f"{param} may not set {key!r}: it {why}", param=f"{param}.{key}")
    return kwargs


def json_chars(value: Any) -> int:
    """Characters of parsed JSON (tools, ``chat_template_kwargs``) written
    out, as a template's ``tojson`` writes them; 0 for None."""
    return 0 if value is None else len(json.dumps(value, ensure_ascii=False))


def check_chat_chars(messages: int, tools: int, kwargs: int, max_model_len: int,
                     messages_param: str = "messages") -> None:
    """A chat's text bounded by the model's context before it is rendered
    (``check_prompt_chars``), on every API: the messages' characters, then
    with the tools' (names, descriptions, parameters) and the
    ``chat_template_kwargs``' the template renders too; the refusal names
    the field that passes the bound (``messages_param`` for the messages)."""
    check_prompt_chars(messages, max_model_len, messages_param)
    check_prompt_chars(messages + tools, max_model_len, "tools")
    check_prompt_chars(messages + tools + kwargs, max_model_len, "chat_template_kwargs")


@dataclass(frozen=True)
class ChatRequest:
    """What the endpoint took from its request body (in OpenAI chat's shapes)."""

    model: str
    messages: list[dict[str, Any]]  # as the template receives them (see ChatMessage.to_template)
    params: SamplingParams
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    include_reasoning: bool = True
    add_special_tokens: bool = False  # the template writes BOS; True adds the tokenizer's too


@dataclass(frozen=True)
class ChatPrompt:
    token_ids: list[int]
    params: SamplingParams  # with a forced tool call's constraint
    tools: ToolRequest | None
    reasoning: Reasoning | None


def prepare_chat(backend: Backend, req: ChatRequest) -> ChatPrompt:
    """Raises InvalidRequestError naming the chat request's fields (the
    engine's ``prompt`` is ``messages``); the caller renames the rest."""
    tokenizer = backend.tokenizer(req.model)
    tools = tool_request(req.tools, req.tool_choice, req.parallel_tool_calls,
                         tokenizer.chat_template, backend.tool_call_parser(req.model))
    text = tokenizer.apply_chat_template(
        template_messages(req.messages), add_generation_prompt=req.add_generation_prompt,
        tools=tools.tools if tools else None, **(req.template_kwargs or {}))
    ids = tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
    params = tools.sampling(req.params) if tools is not None else req.params
    reasoning = None
    if tools is None or tools.choice in ("none", "auto"):  # a forced call is the whole output
        reasoning = reasoning_for(backend.reasoning_parser(req.model), tokenizer.chat_template, text,
                                  params.structured_output is not None, req.include_reasoning)
    try:
        backend.validate(req.model, ids, params)
    except InvalidRequestError as e:
        if e.param == "prompt":
            raise InvalidRequestError(str(e), "messages") from None
        raise
    return ChatPrompt(ids, params, tools, reasoning)
