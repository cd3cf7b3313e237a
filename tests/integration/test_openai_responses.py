"""The Responses API (POST /v1/responses) on a real server, driven by the
official openai client (``client.responses.create``, streamed and not, and
``client.responses.stream``, which checks the event sequence as it
accumulates): answers equal the chat endpoint's for the same conversation,
function tools come back as function_call items, a reasoning model's
thinking as a reasoning item, streamed and whole responses hold the same
items, and what is not served is a 400 naming the field."""

import asyncio
import json

import httpx
import openai
import pytest

from splitserve.cluster.api.backend import LocalBackend
from splitserve.engine.default_model import default_model_path
from tests.fixtures.checkpoints import QWEN3_THINKING_TEMPLATE, with_chat_template
from tests.integration.api_fixtures import client, make_engine, url, wait_until  # noqa: F401
from tests.integration.test_openai_api import AUTH

MODEL, THINKING = "slow", "thinking"
WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"], "additionalProperties": False}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}"\}\}\n'
               r'</tool_call>')
THINK_THEN_ANSWER = r"<think>\n[a-z ]{1,24}\n</think>\n\n[a-z ]{1,16}"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    base = default_model_path()
    thinking = with_chat_template(base, tmp_path_factory.mktemp("thinking") / "q",
                                  QWEN3_THINKING_TEMPLATE)
    backend = LocalBackend({MODEL: make_engine(base, MODEL), THINKING: make_engine(thinking, THINKING)})
    yield backend
    asyncio.run(backend.close())


def idle(local):
    return local.all_blocks_free()


def collect(client, **kw):
    """(events, the final response) of a streamed create."""
    events = list(client.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].type in ("response.completed", "response.incomplete")
    return events, events[-1].response


def same_items(a, b):
    """Output items equal but for their generated ids."""
    strip = lambda items: [{k: v for k, v in i.model_dump(exclude_none=True).items()  # noqa: E731
                            if k not in ("id", "call_id")} for i in items]
    return strip(a) == strip(b)


@pytest.mark.parametrize("stream", [False, True])
def test_text_input_answers_as_chat_does(client, stream):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0)
    kw = dict(model=MODEL, input="hello", max_output_tokens=8, temperature=0)
    r = collect(client, **kw)[1] if stream else client.responses.create(**kw)
    assert r.output_text == chat.choices[0].message.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 8)
    assert r.usage.total_tokens == r.usage.input_tokens + 8 and r.store is False
    assert [i.type for i in r.output] == ["message"] and r.output[0].status == "incomplete"


def test_instructions_and_an_input_list_are_the_conversation(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                          top_p=0.9)
    r = client.responses.create(
        model=MODEL, instructions="be brief", max_output_tokens=6, temperature=0, top_p=0.9,
        input=[{"role": "user", "content": "hi"},
               {"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "hello"}]},
               {"role": "user", "content": [{"type": "input_text", "text": "and?"}]}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert (r.instructions, r.top_p, r.temperature) == ("be brief", 0.9, 0)
    dev = client.responses.create(model=MODEL, max_output_tokens=6, temperature=0, top_p=0.9,
                                  input=[{"role": "developer", "content": "be brief"}, *msgs[1:]])
    assert dev.output_text == r.output_text  # developer is the system role


SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
          "additionalProperties": False}


def test_the_sdk_stream_helper_accepts_the_event_sequence(client):
    kw = dict(model=MODEL, input="json please", max_output_tokens=40, temperature=0,
              text={"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}})
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as s:
        types = [e.type for e in s]
        final = s.get_final_response()
    assert whole.status == final.status == "completed"
    assert set(json.loads(final.output_text)) == {"a"} and final.output_text == whole.output_text
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1 and types == (
        ["response.created", "response.in_progress", "response.output_item.added",
         "response.content_part.added"] + ["response.output_text.delta"] * deltas
        + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
           "response.completed"])
    assert same_items(final.output, whole.output)


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_a_function_call_item(client, stream):
    kw = dict(model=MODEL, input="weather?", tools=[WEATHER], max_output_tokens=40, temperature=0,
              tool_choice={"type": "function", "name": "get_weather"})
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=[CHAT_WEATHER],
        max_tokens=40, temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if stream:
        events, r = collect(client, **kw)
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert args == done[0].arguments == r.output[0].arguments
    else:
        r = client.responses.create(**kw)
    (call,) = r.output
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")
    assert call.arguments == chat.choices[0].message.tool_calls[0].function.arguments
    assert call.call_id.startswith("call_") and r.status == "completed"


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_calls_the_model_writes_and_a_next_turn_takes_the_result(client, stream):
    kw = dict(model=MODEL, input="weather?", tools=[WEATHER], max_output_tokens=60, temperature=0,
              extra_body={"structured_outputs": {"regex": HERMES_CALL}})
    r = collect(client, **kw)[1] if stream else client.responses.create(**kw)
    whole = client.responses.create(**kw)
    assert same_items(r.output, whole.output)
    (call,) = r.output
    assert call.type == "function_call" and set(json.loads(call.arguments)) == {"city"}
    turn = [{"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name,
             "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    nxt = client.responses.create(model=MODEL, input=turn, tools=[WEATHER], max_output_tokens=5,
                                  temperature=0)
    chat = client.chat.completions.create(
        model=MODEL, tools=[CHAT_WEATHER], max_tokens=5, temperature=0, messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.call_id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}])
    assert nxt.usage.input_tokens == chat.usage.prompt_tokens
    assert nxt.output_text == (chat.choices[0].message.content or "")


@pytest.mark.parametrize("stream", [False, True])
def test_a_reasoning_model_answers_with_a_reasoning_item(client, stream):
    kw = dict(model=THINKING, input="why?", max_output_tokens=80, temperature=0,
              extra_body={"structured_outputs": {"regex": THINK_THEN_ANSWER}})
    chat = client.chat.completions.create(model=THINKING, messages=[{"role": "user", "content": "why?"}],
                                          max_tokens=80, temperature=0,
                                          extra_body={"structured_outputs": {"regex": THINK_THEN_ANSWER}})
    if stream:
        events, r = collect(client, **kw)
        thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        assert thought == chat.choices[0].message.reasoning_content
    else:
        r = client.responses.create(**kw)
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert reasoning.content[0].text == chat.choices[0].message.reasoning_content
    assert r.output_text == chat.choices[0].message.content
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens


@pytest.mark.parametrize("fields,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": []}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"include": ["reasoning.encrypted_content", "message.output_text.logprobz"]}, "include[1]"),
    ({"input": [{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}]},
     "input[0].cache_control"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}",
                 "argumnets": "{}"}]}, "input[0].argumnets"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x", "result": "y"}]},
     "input[0].result"),
    ({"input": [{"type": "reasoning", "summary": [], "text": "x"}]}, "input[0].text"),
    ({"input": [{"type": ["message"], "role": "user", "content": "x"}]}, "input[0].type"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "foo"}}}},
     "text.format"),
    ({"max_output_tokens": 100000}, "max_output_tokens"),
    ({"max_tokens": 5}, "max_tokens"),
    ({"input": "x " * 20000}, "input"),
])
def test_what_is_not_served_is_a_400_naming_the_field(url, local, fields, param):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 4, **fields}
    r = httpx.post(f"{url}/v1/responses", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert idle(local)


@pytest.mark.parametrize("fields,param,code", [
    ({"input": [{"role": "user", "content": "hi", "temprature": 0}]}, "input[0].temprature",
     "unknown_parameter"),
    ({"include": ["file_search_call.result"]}, "include[0]", "invalid_value"),
])
def test_an_unknown_item_field_or_include_value_is_refused_as_on_chat(url, fields, param, code):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 4, **fields}
    r = httpx.post(f"{url}/v1/responses", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    assert param.split(".")[-1] in err["message"]


def test_previous_output_items_are_accepted_back_as_input(client):
    """Clients append a response's output items (with their ids, status,
    annotations) to the next input, as OpenAI's docs show."""
    kw = dict(max_output_tokens=80, temperature=0,
              extra_body={"structured_outputs": {"regex": THINK_THEN_ANSWER}})
    first = client.responses.create(model=THINKING, input="why?", **kw)
    assert [i.type for i in first.output] == ["reasoning", "message"]
    items = [i.model_dump(exclude_none=True) for i in first.output]
    assert {"id", "status"} <= set(items[1]) and "annotations" in items[1]["content"][0]
    nxt = client.responses.create(model=THINKING, input=[
        {"role": "user", "content": "why?"}, *items, {"role": "user", "content": "and?"}], **kw)
    assert nxt.status == "completed" and nxt.output_text


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")


def test_a_client_that_leaves_mid_stream_frees_the_blocks(url, local):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{url}/v1/responses", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if "response.output_text.delta" in line:
                break
    assert wait_until(lambda: idle(local), 10)
