"""Crafted bad requests against real HTTP and gRPC servers on loopback over
real engines of tiny checkpoints: wrong types, huge and deeply nested
values, caps just past their limits, non-UTF-8, wrong content types,
malformed JSON and malformed protobuf. None may be answered with a server
fault (HTTP 5xx; gRPC INTERNAL, UNKNOWN, DATA_LOSS); every refusal of a
request that parses names the field; the servers stay up, a normal
request still succeeds and no KV block stays allocated."""

import gzip
import json
import random
import socket
import time

import grpc
import httpx
import pytest

from splitserve.cluster.api.openai_api import build_http_app
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.engine.limits import (MAX_CHOICE_STRINGS, MAX_CHOICES, MAX_JSON_DEPTH, MAX_LOGIT_BIAS,
                                      MAX_REQUEST_ID_CHARS, MAX_SPEC_CHARS, MAX_STOP_STRING_CHARS,
                                      MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TOOLS, max_prompt_chars)
from tests.integration.api_fixtures import engines, local, paths, wait_until  # noqa: F401
from tests.integration.test_grpc_api import GrpcServerThread
from tests.integration.test_openai_api import ServerThread

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MD = (("authorization", f"Bearer {KEY}"),)
MAX_BODY = 256 << 10  # room for the caps just past their limits
CONTEXT = 256  # the tiny checkpoints' max_model_len
BODY_TIMEOUT_S = 1.0  # every fuzz body is sent at once, on loopback
# refusals of a body that is not a JSON object (or not JSON at all): no field to name
BODY_CODES = {"invalid_json", "invalid_encoding", "invalid_content_type", "request_too_large"}
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


def nested_list(depth):
    v = 1
    for _ in range(depth):
        v = [v]
    return v


def nested_dict(depth):
    v = {"type": "string"}
    for _ in range(depth):
        v = {"type": "object", "properties": {"a": v}}
    return v


BAD = [None, True, False, 0, -1, 7, 2**31, 2**64, -2**70, 0.5, -1e-9, 1e308, "", "x", "\u0000\u202e",
       "\ud800", "é" * 3000, "x" * 20000, [], [None], [1, "a"], [[]], list(range(3000)), ["s"] * 300,
       [""] * 5, {}, {"": None}, {"type": "json_schema"}, {str(i): 1 for i in range(1500)},
       nested_list(MAX_JSON_DEPTH + 5), nested_list(900), nested_dict(40), nested_dict(450)]

C, CH = "/v1/completions", "/v1/chat/completions"
OK_C = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
OK_CH = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMMON = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "n", "stream",
          "stream_options", "ignore_eos", "min_tokens", "skip_special_tokens",
          "include_stop_str_in_output", "logit_bias", "response_format", "structured_outputs", "user",
          "store", "metadata", "service_tier", "frobnicate"]
COMPLETION_FIELDS = COMMON + ["prompt", "logprobs", "echo", "suffix", "best_of"]
CHAT_FIELDS = COMMON + ["messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                        "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                        "add_generation_prompt"]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def fuzz_bodies():
    """(path, JSON-object body): each field of each endpoint with wrong,
    huge and nested values, then values inside nested fields."""
    rng = random.Random(16)
    out = []
    for path, ok, fields in ((C, OK_C, COMPLETION_FIELDS), (CH, OK_CH, CHAT_FIELDS)):
        for field in fields:
            out += [(path, {**ok, field: v}) for v in rng.sample(BAD, 5)]
    for v in rng.sample(BAD, 12):
        out += [(CH, {**OK_CH, "messages": [{"role": "user", "content": v}]}),
                (CH, {**OK_CH, "messages": [{"role": v, "content": "hi"}]}),
                (CH, {**OK_CH, "messages": [{"role": "user", "content": [{"type": "text", "text": v}]}]}),
                (CH, {**OK_CH, "messages": [{"role": "assistant", "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": v}}]}]}),
                (CH, {**OK_CH, "tools": [{"type": "function", "function": {"name": "f", "parameters": v}}],
                      "tool_choice": "required"}),
                (CH, {**OK_CH, "tools": [TOOL], "tool_choice": v}),
                (C, {**OK_C, "structured_outputs": {"json": v}}),
                (C, {**OK_C, "structured_outputs": {"regex": v}}),
                (C, {**OK_C, "structured_outputs": {"grammar": v}}),
                (C, {**OK_C, "structured_outputs": {"choice": v}}),
                (CH, {**OK_CH, "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": v}}}),
                (C, {**OK_C, "logit_bias": {"5": v}}),
                (C, {**OK_C, "prompt": [v]}),
                (C, {**OK_C, "prompt": [[1, 2], v]})]
    return out


# Each just past its limit, with the field the 400 must name.
CAPS = [
    (C, {**OK_C, "stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    (C, {**OK_C, "stop": ["s" * (MAX_STOP_STRING_CHARS + 1)]}, "stop"),
    (C, {**OK_C, "stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
    (C, {**OK_C, "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
    (C, {**OK_C, "prompt": ["a"] * MAX_CHOICES, "n": 2}, "prompt"),
    (C, {**OK_C, "prompt": "x" * (max_prompt_chars(CONTEXT) + 1)}, "prompt"),
    (CH, {**OK_CH, "messages": [{"role": "user", "content": "x" * (max_prompt_chars(CONTEXT) // 2)}] * 3},
     "messages"),
    (C, {**OK_C, "structured_outputs": {"json": nested_dict(MAX_JSON_DEPTH)}}, "structured_outputs"),
    (C, {**OK_C, "structured_outputs": {"regex": "a" * (MAX_SPEC_CHARS + 1)}}, "structured_outputs"),
    (C, {**OK_C, "structured_outputs": {"choice": ["a"] * (MAX_CHOICE_STRINGS + 1)}}, "structured_outputs"),
    (C, {**OK_C, "structured_outputs": {"regex": "(" * 5000 + "a" + ")" * 5000}}, "structured_outputs"),
    (CH, {**OK_CH, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": nested_dict(MAX_JSON_DEPTH // 2)}}}, "response_format"),
    (CH, {**OK_CH, "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]},
     "tools"),
    (CH, {**OK_CH, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": nested_dict(MAX_JSON_DEPTH // 2)}}]}, "tools"),
    (CH, {**OK_CH, "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": json.dumps(nested_list(MAX_JSON_DEPTH + 1))}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    (CH, {**OK_CH, "chat_template_kwargs": {"x": nested_list(MAX_JSON_DEPTH)}}, "chat_template_kwargs"),
]

MALFORMED = [  # (bytes, content type or None to send none)
    (b"", "application/json"), (b" ", "application/json"), (b"null", "application/json"),
    (b"[]", "application/json"), (b'"hi"', "application/json"), (b"1e999", "application/json"),
    (b'{"model": "tiny-llama",}', "application/json"), (b"{'model': 'tiny-llama'}", "application/json"),
    (b'{"model": "tiny-llama", "prompt": "hi"} trailing', "application/json"),
    (b'{"model": "tiny-llama", "prompt": "hi", "n": Infinity}', "application/json"),
    (b'{"model": "tiny-llama", "prompt": "hi", "n": -NaN}', "application/json"),
    (b'{"model": "tiny-llama", "prompt": "\xc3\x28"}', "application/json"),
    (b'\xef\xbb\xbf{"model": "tiny-llama", "prompt": "hi"}', "application/json"),
    (b'\xff\xfe{\x00"\x00', "application/json"),
    ('{"model": "tiny-llama", "prompt": "hi"}'.encode("utf-16"), "application/json"),
    (b'{"model": "tiny-llama", "prompt": "\\ud800\\udc00\\ud800"}', "application/json"),
    (b'{"model": "tiny-llama", "prompt": "hi", "prompt": 5}', "application/json"),
    (b"[" * 5000 + b"]" * 5000, "application/json"),
    (b'{"a": ' * 3000 + b"1" + b"}" * 3000, "application/json"),
    (json.dumps(OK_C).encode(), "text/plain"), (json.dumps(OK_C).encode(), "multipart/form-data"),
    (json.dumps(OK_C).encode(), "application/x-www-form-urlencoded"),
    (json.dumps(OK_C).encode(), "application/json; charset=utf-16"),
    (b"model=tiny-llama&prompt=hi", None),
]


def check_http(r, param_required):
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        return
    assert r.status_code in (400, 404, 405, 413), r.text
    assert len(r.content) < 4096
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if r.status_code == 400 and param_required and err["code"] not in BODY_CODES:
        assert err["param"], err
    return err


@pytest.fixture(scope="module")
def http_url(local):
    server = ServerThread(build_http_app(local, [KEY], MAX_BODY, body_timeout_s=BODY_TIMEOUT_S))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def grpc_stub(local):
    server = GrpcServerThread(local, api_keys=[KEY], max_message_bytes=MAX_BODY)
    with grpc.insecure_channel(server.target) as channel:
        yield channel, pb_grpc.GenerationStub(channel)
    server.stop()


def idle(local, engines):
    return local.all_blocks_free() and not any(e.has_unfinished() for e in engines.values())


def test_http_fuzz_never_5xx_and_names_the_field(http_url, local, engines):
    bodies = fuzz_bodies()
    assert len(bodies) > 300
    statuses = set()
    with httpx.Client(base_url=http_url, headers=AUTH, timeout=60) as client:
        for path, body in bodies:
            r = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            statuses.add(r.status_code)
            check_http(r, param_required=True)
        for path, body, param in CAPS:
            r = client.post(path, json=body)
            assert r.status_code == 400 and check_http(r, True)["param"] == param, (param, r.text)
        for content, ctype in MALFORMED:
            for path in (C, CH):
                r = client.post(path, content=content, headers={"Content-Type": ctype} if ctype else {})
                check_http(r, param_required=False)
        for method, path in (("GET", C), ("PUT", CH), ("POST", "/v1/models"), ("POST", "/v1/nope")):
            check_http(client.request(method, path, json=OK_C), param_required=False)
        assert {200, 400} <= statuses
        # still serving, nothing left behind
        assert client.get("/health").status_code == 200
        r = client.post(C, json={**OK_C, "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert wait_until(lambda: idle(local, engines), timeout=10)


P = pb.SamplingParams
HI = [pb.ChatMessage(role="user", content="hi")]
NESTED_SCHEMA = json.dumps(nested_dict(MAX_JSON_DEPTH))


def grpc_cases():
    """(method, request, field the INVALID_ARGUMENT must name or None if it
    may succeed or name any field)."""
    G, T = "Generate", "Tokenize"
    big = "x" * (max_prompt_chars(CONTEXT) + 1)
    cases = [
        (G, dict(text=big), "text"), (T, dict(text=big), "text"),
        (G, dict(messages=[pb.ChatMessage(role="user", content=big)]), "messages"),
        (T, dict(messages=[pb.ChatMessage(role="user", content=big)]), "messages"),
        (G, dict(text="hi", params=P(stop=["s"] * (MAX_STOP_STRINGS + 1))), "stop"),
        (G, dict(text="hi", params=P(stop=["s" * (MAX_STOP_STRING_CHARS + 1)])), "stop"),
        (G, dict(text="hi", params=P(stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1))), "stop_token_ids"),
        (G, dict(text="hi", params=P(stop_token_ids=[1] * 20000)), "stop_token_ids"),
        (G, dict(text="hi", params=P(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)})), "logit_bias"),
        (G, dict(text="hi", params=P(structured_output=pb.StructuredOutput(json_schema=NESTED_SCHEMA))),
         "structured_output"),
        (G, dict(text="hi", params=P(structured_output=pb.StructuredOutput(
            json_schema="[" * 30000 + "]" * 30000))), "structured_output"),
        (G, dict(text="hi", params=P(structured_output=pb.StructuredOutput(
            regex="(" * 20000 + ")" * 20000))), "structured_output"),
        (G, dict(text="hi", params=P(structured_output=pb.StructuredOutput(grammar="start: (" * 5000))),
         "structured_output"),
        (G, dict(text="hi", params=P(structured_output=pb.StructuredOutput(
            choice=pb.Choices(choices=["a"] * (MAX_CHOICE_STRINGS + 1))))), "structured_output"),
        (G, dict(messages=HI, tools=[pb.Tool(name="f", parameters="[" * 900 + "]" * 900)]),
         "tools[0].parameters"),
        (T, dict(messages=HI, tools=[pb.Tool(name="f", parameters=json.dumps(nested_dict(MAX_JSON_DEPTH)))]),
         "tools[0].parameters"),
        (G, dict(messages=HI, tools=[pb.Tool(name=f"f{i}") for i in range(MAX_TOOLS + 1)]), "tools"),
        (G, dict(messages=[pb.ChatMessage(role="assistant", tool_calls=[
            pb.ToolCall(name="f", arguments="[" * 900 + "]" * 900)])]), "messages[0].tool_calls[0].arguments"),
        (G, dict(token_ids=pb.TokenIds(ids=list(range(20000)))), "prompt"),
        # each message counts at least one token's characters (200000 empty ones, 1.6 MB, once
        # took the preparation thread 27 s to render and tokenize); tools count toward the chat too
        (T, dict(messages=[pb.ChatMessage(role="user")] * (CONTEXT + 1)), "messages"),
        (T, dict(messages=HI, tools=[pb.Tool(name="f", description=big)]), "tools"),
    ]
    rng = random.Random(16)
    strings = ["", "x", "\u0000\u202e", "é" * 3000, "x" * 20000, "{", "[" * 3000, "null"]
    floats = [float("nan"), float("inf"), float("-inf"), -1.0, 1e308, -1e-300, 3.0]
    ints = [0, 1, 2, 2**31 - 1]
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        cases += [(G, dict(text="hi", params=P(max_tokens=2, **{name: v})), None)
                  for v in rng.sample(floats, 4)]
    for name in ("top_k", "seed", "min_tokens", "n", "logprobs", "prompt_logprobs"):
        cases += [(G, dict(text="hi", params=P(max_tokens=2, **{name: v})), None) for v in ints]
    cases += [(G, dict(text="hi", params=P(max_tokens=v)), None) for v in ints]
    for s in strings:
        cases += [(G, dict(model=s, text="hi"), None), (T, dict(model=s, text="hi"), None),
                  (G, dict(text=s, params=P(max_tokens=2)), None), (T, dict(text=s), None),
                  (G, dict(messages=[pb.ChatMessage(role=s, content="hi")], params=P(max_tokens=2)), None),
                  (G, dict(messages=[pb.ChatMessage(role="user", content=s)], params=P(max_tokens=2)), None),
                  (G, dict(messages=HI, tools=[pb.Tool(name=s, parameters=s)], params=P(max_tokens=2)), None),
                  (G, dict(messages=HI, tools=[pb.Tool(name="f", parameters=s)], tool_choice="required",
                           params=P(max_tokens=2)), None),
                  (G, dict(messages=HI, tool_choice=s, params=P(max_tokens=2)), None),
                  (G, dict(messages=HI, tool_function=s, params=P(max_tokens=2)), None),
                  (G, dict(text="hi", params=P(stop=[s], max_tokens=2)), None),
                  (G, dict(text="hi", params=P(max_tokens=2, structured_output=pb.StructuredOutput(
                      json_schema=s))), None),
                  (G, dict(text="hi", params=P(max_tokens=2, structured_output=pb.StructuredOutput(
                      regex=s))), None),
                  (G, dict(text="hi", params=P(max_tokens=2, structured_output=pb.StructuredOutput(
                      grammar=s))), None),
                  (G, dict(messages=[pb.ChatMessage(role="assistant", tool_calls=[
                      pb.ToolCall(name=s, arguments=s)])], params=P(max_tokens=2)), None)]
    return cases


# not messages at all: corrupt wire format, a string that is not UTF-8
CORRUPT = [b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x0a\x0atiny-llama\x12\x02\xff\xfe",
           b"\x0a\xff\xff\xff\x0f", b"\x12" + b"\xff" * 10]
# odd but maybe parseable (unknown or mistyped fields)
ODD = [bytes(range(256)), b"\x08" * 100, b"\x0a\x0atiny-llama", b""]


def test_grpc_fuzz_never_a_server_fault_and_names_the_field(grpc_stub, local, engines):
    channel, stub = grpc_stub
    cases = grpc_cases()
    assert len(cases) > 150
    codes = set()
    for method, kw, param in cases:
        kw = {"model": "tiny-llama", **kw}
        try:
            if method == "Generate":
                list(stub.Generate(pb.GenerateRequest(**kw), metadata=MD, timeout=60))
            else:
                stub.Tokenize(pb.TokenizeRequest(**kw), metadata=MD, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert code not in SERVER_FAULTS, (method, str(kw)[:200], e.details())
            assert len(e.details()) <= 1024
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                named = dict(e.trailing_metadata())["splitserve-param"]
                assert named and e.details().startswith(f"{named}: "), (str(kw)[:200], e.details())
                assert param is None or named == param, (param, e.details())
        assert param is None or code == grpc.StatusCode.INVALID_ARGUMENT, (method, param, code)
        codes.add(code)
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= codes
    for raw in CORRUPT + ODD:
        for method, call in (("Generate", channel.unary_stream), ("Tokenize", channel.unary_unary)):
            try:
                r = call(f"/splitserve.v1.Generation/{method}")(raw, metadata=MD, timeout=30)
                list(r) if method == "Generate" else r
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            assert code not in SERVER_FAULTS, (method, raw)
            assert raw not in CORRUPT or code == grpc.StatusCode.INVALID_ARGUMENT, (method, raw)
    # still serving, nothing left behind
    rs = list(stub.Generate(pb.GenerateRequest(model="tiny-llama", text="hi", params=P(
        max_tokens=3, ignore_eos=True)), metadata=MD, timeout=60))
    assert sum(len(r.token_ids) for r in rs) == 3
    assert wait_until(lambda: idle(local, engines), timeout=10)


R = "/v1/responses"
OK_R = {"model": "tiny-llama", "input": "hi", "max_output_tokens": 2}
# a token id past the tiny models' vocabulary (512)
MISSING_TOKEN = "start: <[9999]>"
BIG_INT_SCHEMA = {"type": "array", "minItems": 2**64}  # past the 64 bits a JSON schema number gets
BIG_INT_PARAMS = {"type": "object", "properties": {"a": BIG_INT_SCHEMA}, "required": ["a"]}
NOT_A_SCHEMA = {"type": "object", "properties": 5}
LONG = "x" * (max_prompt_chars(CONTEXT) + 1)  # one character past the prompt bound
TOOL_NO_ID = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "sunny"}]
# Crafted requests once answered with a 500, a 200 that served something else
# than asked, or a 400 naming another field; each with the field its 400 names.
CRAFTED = [
    (CH, {**OK_CH, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": BIG_INT_SCHEMA}}}, "response_format"),
    (C, {**OK_C, "structured_outputs": {"json": BIG_INT_SCHEMA}}, "structured_outputs"),
    (C, {**OK_C, "structured_outputs": {"json": {"type": "integer", "maximum": -2**63 - 1}}},
     "structured_outputs"),
    (CH, {**OK_CH, "tools": [{"type": "function", "function": {"name": "f", "parameters": BIG_INT_PARAMS}}],
          "tool_choice": "required"}, "tools[0].function.parameters"),
    ("/v1/responses", {"model": "tiny-llama", "input": "hi", "max_output_tokens": 2, "text": {"format": {
        "type": "json_schema", "name": "x", "schema": BIG_INT_SCHEMA}}}, "text.format"),
    (CH, {**OK_CH, "messages": TOOL_NO_ID}, "messages[1].tool_call_id"),
    (CH, {**OK_CH, "messages": [*TOOL_NO_ID[:1], {**TOOL_NO_ID[1], "tool_call_id": ""}]},
     "messages[1].tool_call_id"),
    # int() reads these as token ids, but none is one written as OpenAI writes them
    *[(C, {**OK_C, "logit_bias": {key: 5}}, "logit_bias")
      for key in ("\u0969", " 5", "5 ", "+5", "05", "5_0", "9" * 5000)],
    (C, {**OK_C, "n": MAX_CHOICES + 1}, "n"),
    # integers past 64 bits, which the cluster's typed messages cannot carry
    (C, {**OK_C, "top_k": 2**64}, "top_k"),
    (CH, {**OK_CH, "stop_token_ids": [1, 2**64]}, "stop_token_ids"),
    (CH, {**OK_CH, "max_tokens": None, "min_tokens": 10**30}, "min_tokens"),
    ("/v1/responses", {"model": "tiny-llama", "input": "hi", "top_k": -2**63 - 1}, "top_k"),
    # a call without a name, a result without the call it answers
    (CH, {**OK_CH, "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "", "arguments": "{}"}}]}]}, "messages[0].tool_calls[0]"),
    ("/v1/responses", {"model": "tiny-llama", "input": [
        {"type": "function_call", "call_id": "c", "name": "", "arguments": "{}"}]}, "input[0].name"),
    ("/v1/responses", {"model": "tiny-llama", "input": [
        {"type": "function_call_output", "call_id": "", "output": "sunny"}]}, "input[0].call_id"),
    # constraints no output satisfies: once an empty 200 with finish_reason "stop"
    (CH, {**OK_CH, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#"}}}}, "response_format"),
    *[(C, {**OK_C, "structured_outputs": {"regex": rx}}, "structured_outputs") for rx in ("a^b", r"[^\s\S]")],
    (C, {**OK_C, "structured_outputs": {"grammar": "start: start"}}, "structured_outputs"),
    (CH, {**OK_CH, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}],
          "tool_choice": "required"}, "tools[0].function.parameters"),
    ("/v1/responses", {"model": "tiny-llama", "input": "hi", "max_output_tokens": 2, "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"$ref": "#"}}}}, "text.format"),
    # ids the model can never produce, a minimum the context cannot hold
    (CH, {**OK_CH, "stop_token_ids": [1, 10**6]}, "stop_token_ids"),
    (C, {**OK_C, "logit_bias": {str(10**6): 5}}, "logit_bias"),
    (CH, {**OK_CH, "max_tokens": None, "min_tokens": CONTEXT}, "min_tokens"),
    # names the template renderer's own parameters take
    (CH, {**OK_CH, "chat_template_kwargs": {"self": 1}}, "chat_template_kwargs.self"),
    ("/tokenize", {"model": "tiny-llama", "messages": OK_CH["messages"], "chat_template_kwargs": {"self": 1}},
     "chat_template_kwargs.self"),
    ("/tokenize", {"model": "tiny-llama", "messages": OK_CH["messages"],
                   "chat_template_kwargs": {"documents": []}}, "chat_template_kwargs.documents"),
    # and the variables the renderer sets: a forged BOS, a template check silenced
    (CH, {**OK_CH, "chat_template_kwargs": {"bos_token": "<|im_end|>"}}, "chat_template_kwargs.bos_token"),
    (R, {**OK_R, "chat_template_kwargs": {"raise_exception": None}}, "chat_template_kwargs.raise_exception"),
    # a role OpenAI does not define: once named "messages" by the template's refusal
    ("/tokenize", {"model": "tiny-llama", "messages": [*OK_CH["messages"], {"role": "ipython", "content": "x"}]},
     "messages[1].role"),
    # a role or a part type that is a list or an object: once a 500 (looked up in a set)
    (R, {**OK_R, "input": [{"role": ["user"], "content": "hi"}]}, "input[0].role"),
    (R, {**OK_R, "input": [{"role": "user", "content": [{"type": ["input_text"], "text": "hi"}]}]},
     "input[0].content"),
    # each names the input item's own field, not the chat message it becomes
    (R, {**OK_R, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{bad"}]},
     "input[0].arguments"),
    (R, {**OK_R, "input": [{"type": "function_call_output", "call_id": "c", "output": {"a": 1}}]},
     "input[0].output"),
    # a misspelt field is refused, as on chat's response_format
    (R, {**OK_R, "text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "stict": True}}},
     "text.format"),
    (R, {**OK_R, "text": {"format": {"type": "text", "schema": {}}}}, "text.format"),
    (CH, {**OK_CH, "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages[0].content[0].text"),
    # an empty list of parts, once read as an empty message (OpenAI refuses it)
    (CH, {**OK_CH, "messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    (R, {**OK_R, "input": [{"role": "user", "content": []}]}, "input[0].content"),
    # only an assistant's content may be left out (as OpenAI)
    (CH, {**OK_CH, "messages": [{"role": "user"}]}, "messages[0].content"),
    (CH, {**OK_CH, "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "bogus", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].type"),
    (CH, {**OK_CH, "messages": [{"role": "assistant", "tool_calls": [
        {"id": 5, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].id"),
    # refused by the engine, with the model's own tokens: named as the client's field
    (C, {**OK_C, "structured_outputs": {"grammar": MISSING_TOKEN}}, "structured_outputs"),
    (R, {**OK_R, "structured_outputs": {"grammar": MISSING_TOKEN}}, "structured_outputs"),
    # each message counts one token's characters: many empty ones are refused before rendering
    ("/tokenize", {"model": "tiny-llama", "messages": [{"role": "user", "content": ""}] * (CONTEXT + 1)},
     "messages"),
    # the tools and chat_template_kwargs the template renders count too, refused before rendering
    (CH, {**OK_CH, "tools": [{"type": "function", "function": {"name": "f", "description": LONG}}]}, "tools"),
    (CH, {**OK_CH, "chat_template_kwargs": {"notes": LONG}}, "chat_template_kwargs"),
    ("/tokenize", {"model": "tiny-llama", "messages": OK_CH["messages"], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "description": LONG}}}]},
     "tools"),
    (R, {**OK_R, "tools": [{"type": "function", "name": "f", "description": LONG}]}, "tools"),
    (R, {**OK_R, "chat_template_kwargs": {"notes": LONG}}, "chat_template_kwargs"),
    # parameters that are not a JSON schema, whatever tool_choice: once shown to the model as they were
    (CH, {**OK_CH, "tools": [{"type": "function", "function": {"name": "f", "parameters": NOT_A_SCHEMA}}]},
     "tools[0].function.parameters"),
    (R, {**OK_R, "tools": [{"type": "function", "name": "f", "parameters": NOT_A_SCHEMA}], "tool_choice": "none"},
     "tools[0].parameters"),
    ("/tokenize", {"model": "tiny-llama", "messages": OK_CH["messages"], "tools": [
        TOOL, {"type": "function", "function": {"name": "g", "parameters": NOT_A_SCHEMA}}]},
     "tools[1].function.parameters"),
    # the fields beside a schema, and the Responses fields accepted and ignored: each of its type
    (CH, {**OK_CH, "response_format": {"type": "json_schema", "json_schema": {"name": 5, "schema": {}}}},
     "response_format.json_schema.name"),
    (R, {**OK_R, "text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "strict": "yes"}}},
     "text.format.strict"),
    # a schema's name as OpenAI allows it: 1-64 letters, digits, '_' or '-'
    (CH, {**OK_CH, "response_format": {"type": "json_schema", "json_schema": {"name": "", "schema": {}}}},
     "response_format.json_schema.name"),
    (CH, {**OK_CH, "response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    (R, {**OK_R, "text": {"format": {"type": "json_schema", "name": "x" * 65, "schema": {}}}},
     "text.format.name"),
    (R, {**OK_R, "reasoning": {"effort": 5}}, "reasoning.effort"),
    (R, {**OK_R, "reasoning": {"efort": "low"}}, "reasoning"),
    (R, {**OK_R, "text": {"verbosity": ["low"]}}, "text.verbosity"),
    (R, {**OK_R, "stream_options": {"include_obfuscation": False}}, "stream_options"),
    (R, {**OK_R, "stream": True, "stream_options": {"include_usage": True}}, "stream_options"),
    (R, {**OK_R, "max_tool_calls": -1}, "max_tool_calls"),
    # a regex that unrolls to a million positions: refused by its shape, before it compiles
    (C, {**OK_C, "structured_outputs": {"regex": "(a{1000}){1000}"}}, "structured_outputs"),
    (CH, {**OK_CH, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "string", "pattern": "^(a{1000}){1000}$"}}}}, "response_format"),
]


def test_crafted_requests_are_400_naming_the_field(http_url, local, engines):
    with httpx.Client(base_url=http_url, headers=AUTH, timeout=60) as client:
        for path, body, param in CRAFTED:
            r = client.post(path, json=body)
            assert r.status_code == 400 and check_http(r, True)["param"] == param, (param, r.text)
        # the message names the field too, not the engine's name for it
        err = check_http(client.post(C, json={**OK_C, "structured_outputs": {"json": "{bad"}}), True)
        assert err["param"] == "structured_outputs" and "response_format" not in err["message"], err
        # a chain of rules as deep as the size limit allows: once a segmentation fault of the
        # server process (llguidance compiles it recursively)
        rules = "\n".join(f'r{i}: "b" r{i + 1}' for i in range(3800))
        r = client.post(C, json={**OK_C, "structured_outputs": {"grammar": f'start: r0\n{rules}\nr3800: "a"'}})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].strip("b") in ("", "a"), r.text
        # tool call arguments sent as an object count toward the prompt's characters too,
        # refused before tokenizing
        long_args = {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": {"a": "x" * max_prompt_chars(CONTEXT)}}}]}
        r = client.post(CH, json={**OK_CH, "messages": [long_args]})
        assert r.status_code == 400 and "characters" in check_http(r, True)["message"], r.text
        # a repeated key: parsers disagree on which one counts (a proxy may check the first)
        for raw, param in (('{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "max_tokens": 3}',
                            "max_tokens"),
                           ('{"model": "tiny-llama", "prompt": "hi", "logit_bias": {"5": 1, "5": -100}}',
                            "logit_bias")):
            r = client.post(C, content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and check_http(r, True)["param"] == param, r.text
        # the message names the field the client used, as param does
        for path, body, field in ((CH, {**OK_CH, "max_tokens": None, "max_completion_tokens": 10**6},
                                   "max_completion_tokens"),
                                  ("/v1/responses", {"model": "tiny-llama", "input": "hi",
                                                     "max_output_tokens": 0}, "max_output_tokens")):
            err = check_http(client.post(path, json=body), True)
            assert err["param"] == field and field in err["message"], err
            assert "max_tokens" not in err["message"], err
        # a compressed body is refused as such, not read as bad UTF-8 or JSON
        r = client.post(C, content=gzip.compress(json.dumps(OK_C).encode()),
                        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_encoding"
        # a body that stops short of its Content-Length: 408 after the body timeout, closed
        _truncated_body_times_out(http_url)
        # the connection that carried them still serves (a 500 once closed it)
        r = client.post(C, json=OK_C)
        assert r.status_code == 200
        # the answer's id in its own header (Ray Serve's proxy writes x-request-id)
        assert r.headers.get_list("x-splitserve-request-id") == [r.json()["id"]]
        assert "x-request-id" not in r.headers
        for path, body in ((CH, {**OK_CH, "stream": True}),
                           ("/v1/responses", {"model": "tiny-llama", "input": "hi", "max_output_tokens": 2})):
            with client.stream("POST", path, json=body) as r:
                assert r.status_code == 200 and len(r.headers.get_list("x-splitserve-request-id")) == 1
                r.read()
    assert wait_until(lambda: idle(local, engines), timeout=10)


def _truncated_body_times_out(http_url: str) -> None:
    host, port = http_url.removeprefix("http://").split(":")
    head = (f"POST {C} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT_S + 3) as sock:
        t0 = time.monotonic()
        sock.sendall(head.encode() + b'{"model": ')
        got = b""
        while chunk := sock.recv(65536):  # to EOF: the server closes the connection
            got += chunk
        took = time.monotonic() - t0
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), got
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and "endpoints.body_timeout_s" in err["message"], err
    # timers may fire a little early (one run: 0.99998 s): a 0.1 s margin
    assert BODY_TIMEOUT_S - 0.1 <= took < BODY_TIMEOUT_S + 1.5


GRPC_CRAFTED = [
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(
        json_schema=json.dumps(BIG_INT_SCHEMA)))), "structured_output"),
    (dict(messages=HI, tools=[pb.Tool(name="f", parameters=json.dumps(BIG_INT_PARAMS))], tool_choice="required"),
     "tools[0].parameters"),
    (dict(messages=[*HI, pb.ChatMessage(role="tool", content="sunny")]), "messages[1].tool_call_id"),
    (dict(messages=HI, chat_template_kwargs='{"self": 1}'), "chat_template_kwargs.self"),
    (dict(messages=HI, chat_template_kwargs='{"add_generation_prompt": false}'),
     "chat_template_kwargs.add_generation_prompt"),
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(grammar="start: start"))),
     "structured_output"),
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(json_schema='{"$ref": "#"}'))),
     "structured_output"),
    (dict(messages=HI, tools=[pb.Tool(name="f", parameters='{"$ref": "#"}')], tool_choice="required"),
     "tools[0].parameters"),
    (dict(text="hi", params=P(stop_token_ids=[1, 10**6])), "stop_token_ids"),
    (dict(text="hi", params=P(min_tokens=CONTEXT)), "min_tokens"),
    # refused by the engine, with the model's own tokens
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(grammar=MISSING_TOKEN))),
     "structured_output"),
    # echoed on every response of the stream
    (dict(text="hi", request_id="r" * (MAX_REQUEST_ID_CHARS + 1)), "request_id"),
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(regex="(a{1000}){1000}"))),
     "structured_output"),
]


def test_grpc_crafted_requests_are_invalid_argument_naming_the_field(grpc_stub, local, engines):
    _, stub = grpc_stub
    for kw, param in GRPC_CRAFTED:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(model="tiny-llama", **kw), metadata=MD, timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (param, e.value.details())
        assert dict(e.value.trailing_metadata())["splitserve-param"] == param, e.value.details()
    # the message names the field the client used, as the param does
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(model="tiny-llama", messages=HI, tool_function="f"),
                           metadata=MD, timeout=60))
    assert e.value.details().startswith("tool_function: tool_function names 'f'"), e.value.details()
    assert wait_until(lambda: idle(local, engines), timeout=10)
