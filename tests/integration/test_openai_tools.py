"""Tool calling through the OpenAI HTTP API (real uvicorn on loopback, the
official client, real engines of the default model): forced calls are the
engine's constrained output, parsed calls come out of the model's text,
streamed and whole responses agree, and bad tool requests are 400s naming
the field."""

import asyncio
import json

import openai
import pytest

from splitserve.cluster.api.backend import LocalBackend
from splitserve.cluster.api.openai_api import build_http_app
from splitserve.cluster.api.tool_calls import template_messages
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.api_fixtures import client, engines, local, make_engine, paths, url  # noqa: F401
from tests.integration.test_openai_api import INVALID, KEY, ServerThread, assert_error, idle, post

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
MODEL = "slow"  # the default model: its context holds the tool definitions
ASK = [{"role": "user", "content": "weather?"}]
# what a Hermes-format model writes to call a tool
HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}"\}\}\n'
               r'</tool_call>')


@pytest.fixture(scope="module")
def ref(paths):
    """A second engine of the served model: the reference outputs."""
    return make_engine(paths[MODEL], MODEL)


def prompt_ids(engine, messages, tools):
    text = engine.tokenizer.apply_chat_template(template_messages(messages), tools=tools)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def create(client, stream, **kw):
    """(content, [(name, arguments)], finish_reason, call ids) of choice 0,
    assembled from the chunks as a streaming client does when ``stream``."""
    r = client.chat.completions.create(model=MODEL, stream=stream, **kw)
    if not stream:
        m = r.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return m.content, calls, r.choices[0].finish_reason, [c.id for c in m.tool_calls or []]
    content, calls, finish = None, {}, None
    for chunk in r:
        ch = chunk.choices[0]
        if ch.delta.content:
            content = (content or "") + ch.delta.content
        for d in ch.delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = d.id or c["id"]
            c["name"] += (d.function.name or "") if d.function else ""
            c["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = ch.finish_reason or finish
    ordered = [calls[k] for k in sorted(calls)]
    return content, [(c["name"], c["arguments"]) for c in ordered], finish, [c["id"] for c in ordered]


@pytest.mark.parametrize("stream", [False, True])
def test_named_function_is_the_constrained_output(client, ref, stream):
    eng = ref
    spec = {"type": "json", "value": json.dumps(WEATHER["function"]["parameters"])}
    ref = ref.generate([prompt_ids(eng, ASK, [WEATHER, TIME])], SamplingParams(
        max_tokens=40, temperature=0.0, structured_output=spec))[0]
    content, calls, finish, ids = create(
        client, stream, messages=ASK, tools=[WEATHER, TIME], max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert calls == [("get_weather", ref.text)] and finish == ref.finish_reason == "stop"
    assert content is None and ids[0].startswith("call_")
    assert set(json.loads(ref.text)) == {"city"}


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_known_functions(client, parallel):
    for seed in range(3):
        content, calls, finish, ids = create(
            client, False, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
            parallel_tool_calls=parallel, max_tokens=120, temperature=1.0, seed=seed)
        if finish == "length":  # a long random array: cut, so returned as text
            assert content and not calls
            continue
        assert finish == "tool_calls" and content is None and len(set(ids)) == len(calls) >= 1
        assert parallel or len(calls) == 1
        for name, args in calls:
            args = json.loads(args)
            assert name in ("get_weather", "get_time")
            assert set(args) == ({"city"} if name == "get_weather" else set())


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_calls_the_model_writes(client, ref, stream):
    # the regex makes the tiny model write a call the way Hermes models do
    eng = ref
    ref = eng.generate([prompt_ids(eng, ASK, [WEATHER])], SamplingParams(
        max_tokens=60, temperature=0.0, structured_output={"type": "regex", "value": HERMES_CALL}))[0]
    city = json.loads(ref.text.split("\n")[1])["arguments"]["city"]
    content, calls, finish, _ = create(client, stream, messages=ASK, tools=[WEATHER], max_tokens=60,
                                       temperature=0, extra_body={"structured_outputs": {"regex": HERMES_CALL}})
    assert (content, calls, finish) == (None, [("get_weather", json.dumps({"city": city}))], "tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_without_a_call_is_plain_content(client, stream):
    plain = create(client, False, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=12,
                   temperature=0)
    auto = create(client, stream, messages=ASK, tools=[WEATHER], max_tokens=12, temperature=0)
    assert plain[1:] == auto[1:] == ([], "length", [])
    assert auto[0] == plain[0] and plain[0]


def test_a_conversation_with_tool_results(client, ref):
    msgs = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    eng = ref
    ref = eng.generate([prompt_ids(eng, msgs, [WEATHER])], SamplingParams(max_tokens=5, temperature=0.0))[0]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=5,
                                       temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)


CH = "/v1/chat/completions"
OK = {"model": MODEL, "messages": ASK, "max_tokens": 2}


@pytest.mark.parametrize("body,param", [
    ({**OK, "tools": [{"type": "function"}]}, "tools[0].function"),
    ({**OK, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({**OK, "tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({**OK, "tools": "get_weather"}, "tools"),
    ({**OK, "tool_choice": "required"}, "tool_choice"),
    ({**OK, "tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({**OK, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
    ({**OK, "tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({**OK, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "foo"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ({**OK, "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({**OK, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
])
def test_bad_tool_requests_are_400_naming_the_field(url, local, engines, body, param):
    assert_error(post(url, CH, body), 400, INVALID, param)
    assert idle(local, engines)



# what a Llama 3 JSON-format model writes to call a tool
LLAMA3_CALL = r'\{"name": "get_weather", "parameters": \{"city": "[a-z]{1,8}"\}\}'


def test_a_models_tool_call_parser_setting_overrides_detection(paths):
    """The default model's template reads as Hermes; set to llama3_json, its
    JSON calls are parsed as calls (the served model's setting, not the request's)."""
    eng = make_engine(paths[MODEL], MODEL)
    ref = eng.generate([prompt_ids(eng, ASK, [WEATHER])], SamplingParams(
        max_tokens=40, temperature=0.0, structured_output={"type": "regex", "value": LLAMA3_CALL}))[0]
    city = json.loads(ref.text)["parameters"]["city"]
    backend = LocalBackend({MODEL: eng}, tool_call_parsers={MODEL: "llama3_json"})
    server = ServerThread(build_http_app(backend, [KEY], 1 << 20))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        for stream in (False, True):
            content, calls, finish, _ = create(
                client, stream, messages=ASK, tools=[WEATHER], max_tokens=40, temperature=0,
                extra_body={"structured_outputs": {"regex": LLAMA3_CALL}})
            assert (content, calls, finish) == (
                None, [("get_weather", json.dumps({"city": city}))], "tool_calls")
    finally:
        server.stop()
        asyncio.run(backend.close())
