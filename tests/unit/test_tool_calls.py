"""Tool calling's request checks and output parsing (splitserve.cluster.api.tool_calls):
every format parsed whole and streamed in pieces gives the same calls and
content; output that is not a well-formed call stays content, whole."""

import json

import pytest

from splitserve.cluster.api.tool_calls import (HERMES, LLAMA3_JSON, MISTRAL, parser_for, template_messages,
                                tool_request)
from splitserve.engine.errors import InvalidRequestError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TEMPLATES = {"hermes": "{% for t in tools %}<tool_call>{% endfor %}",
             "mistral": "[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]",
             "llama3_json": "<|start_header_id|>ipython<|end_header_id|><|python_tag|><|eom_id|>"}


def run(req, pieces):
    """Feed ``pieces`` as streamed deltas; (content, calls, finish_reason)
    as a streaming client would assemble them, and the final message."""
    tc = req.calls()
    content, calls = "", {}
    for piece in pieces:
        c, deltas = tc.feed(piece)
        content += c
        for d in deltas:
            calls.setdefault(d["index"], {"name": "", "arguments": ""})
            calls[d["index"]]["name"] += d.get("function", {}).get("name", "")
            calls[d["index"]]["arguments"] += d["function"].get("arguments", "")
    c, deltas = tc.finish()
    content += c
    for d in deltas:
        calls[d["index"]] = {"name": d["function"]["name"], "arguments": d["function"]["arguments"]}
    return content, [calls[k] for k in sorted(calls)], tc.finish_reason("stop"), tc.message()


def in_pieces(text):
    """The text whole, char by char, and in 3-char chunks."""
    return [[text], list(text), [text[i:i + 3] for i in range(0, len(text), 3)]]


def auto(template_kind):
    return tool_request([WEATHER, TIME], None, None, TEMPLATES[template_kind])


CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
PARIS = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.mark.parametrize("kind,text,content,calls", [
    ("hermes", f"<tool_call>\n{CALL}\n</tool_call>", "", [PARIS]),
    ("hermes", f"Let me check. <tool_call>{CALL}</tool_call>\n<tool_call>"
               '{"name": "get_time", "arguments": {}}</tool_call>',
     "Let me check. ", [PARIS, {"name": "get_time", "arguments": "{}"}]),
    ("hermes", f"<tool_call>{CALL}", "", [PARIS]),  # stopped before the closing tag
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',
     "", [PARIS]),  # arguments written as a JSON string
    ("mistral", f"[TOOL_CALLS][{CALL}]", "", [PARIS]),
    ("mistral", 'ok [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "ok ", [PARIS]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "get_time", "parameters": {}}', "",
     [PARIS, {"name": "get_time", "arguments": "{}"}]),
])
def test_calls_parse_the_same_whole_and_streamed(kind, text, content, calls):
    assert parser_for(TEMPLATES[kind]).name == kind
    for pieces in in_pieces(text):
        got_content, got_calls, finish, message = run(auto(kind), pieces)
        assert got_content.strip() == content.strip()
        assert got_calls == calls and finish == "tool_calls"
        assert [c["function"] for c in message["tool_calls"]] == calls
        assert all(c["id"].startswith("call_") and c["type"] == "function" for c in message["tool_calls"])
        assert message["content"] == (content or None)


@pytest.mark.parametrize("kind,text", [
    ("hermes", "no calls here, though < and <tool are written"),
    ("hermes", "<tool_call>{not json}</tool_call>"),
    ("hermes", f"<tool_call>{CALL}</tool_call> and then more text"),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),
    ("hermes", "<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>"),
    ("mistral", "[TOOL_CALLS]get_weather{}"),
    ("llama3_json", 'the answer is {"name": "get_weather", "parameters": {}}'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Pa'),  # cut by length
    ("llama3_json", "<|python"),
])
def test_output_that_is_not_a_call_is_content_whole(kind, text):
    for pieces in in_pieces(text):
        content, calls, finish, message = run(auto(kind), pieces)
        assert (content, calls, finish) == (text, [], "stop")
        assert message == {"role": "assistant", "content": text}


def test_parallel_tool_calls_false_keeps_the_first_call():
    req = tool_request([WEATHER, TIME], "auto", False, TEMPLATES["hermes"])
    text = f'<tool_call>{CALL}</tool_call><tool_call>{{"name": "get_time", "arguments": {{}}}}</tool_call>'
    assert run(req, [text])[1] == [PARIS]


def test_named_function_streams_its_arguments_and_keeps_finish_stop():
    req = tool_request([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}},
                       None, "")
    assert json.loads(req.constraint["value"]) == WEATHER["function"]["parameters"]
    content, calls, finish, message = run(req, ['{"ci', 'ty": "Par', 'is"}'])
    assert (content, calls, finish) == ("", [PARIS], "stop")
    assert message["content"] is None and message["tool_calls"][0]["function"] == PARIS


def test_required_constrains_to_an_array_of_known_calls():
    req = tool_request([WEATHER, TIME], "required", None, "")
    schema = json.loads(req.constraint["value"])
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]] == ["get_weather", "get_time"]
    # a function without parameters takes an empty object
    assert schema["items"]["anyOf"][1]["properties"]["arguments"]["additionalProperties"] is False
    assert json.loads(tool_request([WEATHER], "required", False, "").constraint["value"])["maxItems"] == 1
    text = f'[{CALL}, {{"name": "get_time", "arguments": {{}}}}]'
    for pieces in in_pieces(text):
        content, calls, finish, _ = run(req, pieces)
        assert (content, calls, finish) == ("", [PARIS, {"name": "get_time", "arguments": "{}"}], "tool_calls")
    # cut by length: not a call; the text is content
    assert run(req, ['[{"name": "get_weather", "argu'])[:3] == ('[{"name": "get_weather", "argu', [], "stop")


def test_tool_choice_none_and_no_tools():
    assert tool_request(None, None, None, "") is None
    assert tool_request(None, "none", None, "") is None
    req = tool_request([WEATHER], "none", None, "")
    assert req.tools == [WEATHER] and req.calls() is None and req.constraint is None


@pytest.mark.parametrize("tools,choice,param", [
    ([{"type": "function"}], None, "tools[0].function"),
    ([{"type": "retrieval", "function": {"name": "x"}}], None, "tools[0]"),
    ([{"type": "function", "function": {"name": "x"}, "extra": 1}], None, "tools[0]"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, "tools[0].function.name"),
    # OpenAI's rule for function names: letters, digits, '_' and '-' only
    ([{"type": "function", "function": {"name": "a.b"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f\n"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x", "color": "red"}}], None, "tools[0].function"),
    ([{"type": "function", "function": {"name": "x", "description": 5}}], None,
     "tools[0].function.description"),
    ([{"type": "function", "function": {"name": "x", "strict": "yes"}}], None, "tools[0].function.strict"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}], None,
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "x", "parameters": []}}], None,
     "tools[0].function.parameters"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    ([WEATHER] * 129, None, "tools"),
    (None, "auto", "tool_choice"),
    (None, "required", "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([WEATHER], {"type": "function"}, "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "get_weather"}, "x": 1}, "tool_choice"),
    # a schema the constraint cannot compile, named or required
    ([WEATHER, {"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"a": {"type": "foo"}}}}}],
     {"type": "function", "function": {"name": "bad"}}, "tools[1].function.parameters"),
    ([WEATHER, {"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"a": {"type": "foo"}}}}}], "required",
     "tools[1].function.parameters"),
])
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(InvalidRequestError) as err:
        tool_request(tools, choice, None, "")
    assert err.value.param == param


def test_auto_and_none_check_schemas_without_compiling_them():
    # the model only reads them: a JSON schema llguidance does not compile ("not") is served
    uncompiled = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "not": {"required": ["a"]}}}}
    assert tool_request([uncompiled], "auto", None, "").constraint is None
    # what is no JSON schema at all is refused, naming it
    bad = {"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"a": {"type": "foo"}}}}}
    for choice in ("auto", "none"):
        with pytest.raises(InvalidRequestError, match="not a JSON schema: at .properties.a.type") as err:
            tool_request([TIME, bad], choice, None, "")
        assert err.value.param == "tools[1].function.parameters"


def test_template_messages_give_arguments_as_objects():
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                  "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = template_messages(msgs)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[0] is msgs[0] and out[2] is msgs[2]
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # not mutated
    # OpenAI's clients send instructions as "developer": the template gets a system message
    dev = {"role": "developer", "content": "be brief"}
    assert template_messages([dev, *msgs]) == [{**dev, "role": "system"}, *out]


@pytest.mark.parametrize("msg,param", [
    ({"role": "user", "tool_calls": []}, "messages[0].tool_calls"),
    ({"role": "assistant", "tool_calls": [{"function": "f"}]}, "messages[0].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "messages[0].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[" * 5000}}]},
     "messages[0].tool_calls[0].function.arguments"),  # too deep to parse
    # a role OpenAI does not define: once refused by the template, naming only "messages"
    ({"role": "wizard", "content": "hi"}, "messages[0].role"),
    ({"role": "function", "content": "hi"}, "messages[0].role"),
])
def test_bad_tool_calls_in_messages_name_the_field(msg, param):
    with pytest.raises(InvalidRequestError) as err:
        template_messages([msg])
    assert err.value.param == param


def test_format_detection():
    assert parser_for(None) is HERMES and parser_for("{{ messages }}") is HERMES
    assert parser_for(TEMPLATES["mistral"]) is MISTRAL and MISTRAL.needs_special_tokens
    assert parser_for(TEMPLATES["llama3_json"]) is LLAMA3_JSON


def test_a_named_format_overrides_detection():
    assert parser_for(TEMPLATES["hermes"], "mistral") is MISTRAL
    assert parser_for(TEMPLATES["mistral"], "auto") is MISTRAL
    req = tool_request([WEATHER], None, None, TEMPLATES["hermes"], "mistral")
    assert run(req, [f"[TOOL_CALLS][{CALL}]"])[1] == [PARIS]
    hermes_text = f"<tool_call>{CALL}</tool_call>"  # not this model's format: content
    assert run(req, [hermes_text])[:2] == (hermes_text, [])
