"""The gRPC API's messages in the engine's and the chat layer's terms:
``SamplingParams`` from ``pb.SamplingParams``, chat messages, tools and
``chat_template_kwargs`` for the chat template, and the ``GenerateResponse``
of one output. Errors name this API's fields (``tools[0].name``, not the
OpenAI API's ``tools[0].function.name``)."""

from __future__ import annotations

from splitserve.engine import json_text
from splitserve.cluster.api.chat_output import ChatOutput
from splitserve.cluster.api.chat_prompt import check_chat_chars as chat_chars
from splitserve.cluster.api.chat_prompt import template_kwargs
from splitserve.cluster.api.openai_schema import renamed
from splitserve.cluster.api.openai_structured import check_constraint
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.tool_calls import ToolRequest, template_messages, tool_request
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import PROMPT_CHARS_PER_TOKEN
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.structured import choice_spec, json_object_spec


def sampling_params(p: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. Not validated
    here: the backend validates (and knows the context length)."""
    def opt(name: str, default):
        return getattr(p, name) if p.HasField(name) else default

    params = SamplingParams(
        max_tokens=opt("max_tokens", None), temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0), top_k=opt("top_k", -1), min_p=opt("min_p", 0.0),
        seed=opt("seed", None), presence_penalty=opt("presence_penalty", 0.0),
        frequency_penalty=opt("frequency_penalty", 0.0),
        repetition_penalty=opt("repetition_penalty", 1.0),
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens, logprobs=opt("logprobs", None),
        prompt_logprobs=opt("prompt_logprobs", None),
        skip_special_tokens=opt("skip_special_tokens", True),
        include_stop_str_in_output=p.include_stop_str_in_output, n=opt("n", 1),
        logit_bias=dict(p.logit_bias), speculative=opt("speculative", True),
        structured_output=structured_of(p.structured_output) if p.HasField("structured_output")
        else None)
    if params.n != 1:
        raise InvalidRequestError(
            f"n={params.n}: a Generate stream carries one sample; open one stream per sample "
            "(with seeds, for reproducible ones)", param="n")
    return params


def structured_of(so: pb.StructuredOutput) -> dict[str, str] | None:
    if so.WhichOneof("kind") == "json_schema":
        # the engine parses the schema leniently (json.loads); this API's JSON
        # text is held to the HTTP body's rules first
        json_text.parse_field(so.json_schema, "structured_output")
    spec = structured_spec_of(so)
    if spec is not None:
        check_constraint(spec, "structured_output")  # here, to name this API's field
    return spec


def structured_spec_of(so: pb.StructuredOutput) -> dict[str, str] | None:
    kind = so.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        if not so.json_object:
            raise InvalidRequestError("structured_output.json_object must be true when set",
                                      param="structured_output")
        return json_object_spec()
    if kind == "choice":
        return choice_spec(list(so.choice.choices), "structured_output")
    return {"type": {"json_schema": "json"}.get(kind, kind), "value": getattr(so, kind)}


def chat_messages(msgs) -> list[dict]:
    out = []
    for m in msgs:
        d = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                               for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    try:
        return template_messages(out)
    except InvalidRequestError as e:
        raise grpc_fields(e) from None


def grpc_fields(e: InvalidRequestError) -> InvalidRequestError:
    """An error of splitserve.cluster.api.tool_calls naming this API's fields: a Tool or a
    ToolCall has no "function" level (``tools[0].name``, not
    ``tools[0].function.name``)."""
    return InvalidRequestError(str(e).replace(".function", ""), param=(e.param or "").replace(".function", ""))


def tool_list(pb_tools) -> list[dict]:
    """Tools in OpenAI's form (what chat templates and splitserve.cluster.api.tool_calls take)."""
    tools = []
    for i, t in enumerate(pb_tools):
        fn = {"name": t.name, **({"description": t.description} if t.description else {})}
        if t.parameters:
            fn["parameters"] = json_text.parse_field(t.parameters, f"tools[{i}].parameters")
        tools.append({"type": "function", "function": fn})
    return tools


def template_tools(pb_tools) -> list[dict]:
    """Checked tools for rendering a chat (Tokenize)."""
    try:
        return tool_request(tool_list(pb_tools), "none", None, None).tools
    except InvalidRequestError as e:
        raise grpc_fields(e) from None


def request_tools(req: pb.GenerateRequest, chat_template: str | None,
           parser: str = "auto") -> ToolRequest | None:
    """The request's tool calling (splitserve.cluster.api.tool_calls), errors naming this
    API's fields."""
    if not req.messages and (req.tools or req.tool_choice or req.tool_function):
        raise InvalidRequestError("tools need a chat (messages)", param="tools")
    tools = tool_list(req.tools)
    if req.tool_choice and req.tool_function:
        raise InvalidRequestError("set tool_choice or tool_function, not both", param="tool_function")
    choice = ({"type": "function", "function": {"name": req.tool_function}} if req.tool_function
              else req.tool_choice or None)
    parallel = req.parallel_tool_calls if req.HasField("parallel_tool_calls") else None
    try:
        return tool_request(tools or None, choice, parallel, chat_template, parser)
    except InvalidRequestError as e:
        e = grpc_fields(e)
        if req.tool_function and e.param == "tool_choice":
            e = renamed(e, {"tool_choice": "tool_function"})
        raise e from None


def generate_response(out: dict, request_id: str, timings: dict[str, float] | None,
              chat: ChatOutput | None = None) -> pb.GenerateResponse:
    text, reason = out["text"], out["finish_reason"]
    deltas: list[dict] = []
    reasoning = ""
    if chat is not None:
        step = chat.step(text, len(out["token_ids"]), out["finished"], reason)
        reasoning, text, deltas, reason = step.reasoning, step.content, step.tool_calls, step.finish_reason
    r = pb.GenerateResponse(
        request_id=request_id, token_ids=out["token_ids"], text=text, reasoning_content=reasoning,
        finish_reason=(reason or "") if out["finished"] else "",
        usage=pb.Usage(prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                       cached_tokens=out["cached_tokens"]))
    for d in deltas:
        fn = d["function"]
        r.tool_calls.add(index=d["index"], id=d.get("id", ""), name=fn.get("name", ""),
                         arguments=fn.get("arguments", ""))
    for lp in out.get("logprobs") or ():
        add_logprob(r.logprobs, lp)
    for lp in (out.get("prompt_logprobs") or [None])[1:]:
        add_logprob(r.prompt_logprobs, lp)
    if timings is not None:
        r.timings.update(timings)
    return r


def add_logprob(field, lp: dict) -> None:
    field.add(token_id=lp["token_id"], logprob=lp["logprob"],
              top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp["top"]])


def chat_template_kwargs(text: str) -> dict:
    """``chat_template_kwargs``: a JSON object as text; empty: none."""
    if not text:
        return {}
    kwargs = json_text.parse_field(text, "chat_template_kwargs")
    return template_kwargs(kwargs)


def messages_chars(msgs) -> int:
    """Characters the chat template may render of the messages: each one's
    strings (role, content, tool_call_id, its tool calls' ids, names and
    arguments), and at least one token's worth per message (its role's
    marker), so that many empty messages are bounded as well as long ones."""
    return sum(PROMPT_CHARS_PER_TOKEN + len(m.role) + len(m.content) + len(m.tool_call_id)
               + sum(len(c.id) + len(c.name) + len(c.arguments) for c in m.tool_calls) for m in msgs)


def check_chat_chars(req: pb.GenerateRequest | pb.TokenizeRequest, max_model_len: int) -> None:
    """A chat's text bounded by the model's context before it is rendered
    (chat_prompt's ``check_chat_chars``): the messages, the tools' names,
    descriptions and parameters, ``chat_template_kwargs``' text."""
    tools = sum(len(t.name) + len(t.description) + len(t.parameters) for t in req.tools)
    chat_chars(messages_chars(req.messages), tools, len(req.chat_template_kwargs), max_model_len)
