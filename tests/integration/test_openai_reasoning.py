"""Reasoning output through the chat API and gRPC (real servers on loopback,
the official openai client, engines of the default model whose checkpoints
carry a Qwen3-style or a DeepSeek-R1-style chat template): the thinking
comes back as ``reasoning_content`` apart from the content, streamed and
whole alike, the template's variables (``enable_thinking``) reach it, and
tool calls are read from the content after the reasoning. Expected splits
are computed from a reference engine's raw text with plain string
operations, not with the parser under test."""

import asyncio
import json

import grpc
import openai
import pytest

from splitserve.cluster.api.backend import Backend, LocalBackend
from splitserve.cluster.api.openai_api import build_http_app
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.engine.default_model import default_model_path
from splitserve.engine.sampling_params import SamplingParams
from splitserve.cluster.api.backend import DEFAULT_OPTIONS
from tests.fixtures.checkpoints import (DEEPSEEK_R1_TEMPLATE, QWEN3_THINKING_TEMPLATE,
                                        with_chat_template)
from tests.integration.api_fixtures import client, make_engine, url  # noqa: F401
from tests.integration.test_grpc_api import GrpcServerThread
from tests.integration.test_openai_api import KEY, ServerThread

QWEN3, R1 = "tiny-qwen3-thinking", "tiny-r1"
ASK = [{"role": "user", "content": "why?"}]
THINK_THEN_ANSWER = r"<think>\n[a-z ]{1,24}\n</think>\n\n[a-z ]{1,16}"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
THINK_THEN_CALL = (r'<think>[a-z ]{1,20}</think>\n<tool_call>\n\{"name": "get_weather", '
                   r'"arguments": \{"city": "[a-z]{1,8}"\}\}\n</tool_call>')
MD = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module")
def base():
    return default_model_path()


@pytest.fixture(scope="module")
def local(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("thinking")
    engines = {QWEN3: make_engine(with_chat_template(base, root / "q", QWEN3_THINKING_TEMPLATE), QWEN3),
               R1: make_engine(with_chat_template(base, root / "r1", DEEPSEEK_R1_TEMPLATE), R1)}
    backend = LocalBackend(engines)
    yield backend
    asyncio.run(backend.close())


@pytest.fixture(scope="module")
def ref(base):
    return make_engine(base, "ref")


def reference(local, ref, model, params, tools=None, **template_kwargs):
    text = local.tokenizer(model).apply_chat_template(ASK, tools=tools, **template_kwargs)
    ids = local.tokenizer(model).encode(text, add_special_tokens=False)
    return ref.generate([ids], params)[0]


def chat(client, model, stream, **kw):
    """(reasoning_content, content, [(name, arguments)], finish_reason, usage) of choice 0,
    assembled from the chunks as a streaming client does when ``stream``."""
    r = client.chat.completions.create(model=model, messages=ASK, stream=stream, temperature=0, **kw)
    if not stream:
        m = r.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return getattr(m, "reasoning_content", None), m.content, calls, r.choices[0].finish_reason, r.usage
    reasoning = content = None
    calls, finish = [], None
    for chunk in r:
        d = chunk.choices[0].delta
        if getattr(d, "reasoning_content", None):
            reasoning = (reasoning or "") + d.reasoning_content
        if d.content:
            content = (content or "") + d.content
        calls += [(c.function.name, c.function.arguments) for c in d.tool_calls or []]
        finish = chunk.choices[0].finish_reason or finish
    return reasoning, content, calls, finish, None


@pytest.mark.parametrize("stream", [False, True])
def test_qwen3_thinking_comes_back_apart_from_the_answer(client, local, ref, stream):
    spec = {"type": "regex", "value": THINK_THEN_ANSWER}
    want = reference(local, ref, QWEN3, SamplingParams(max_tokens=80, temperature=0.0,
                                                        structured_output=spec))
    assert want.text.startswith("<think>\n") and "</think>" in want.text
    thought, _, answer = want.text.removeprefix("<think>").partition("</think>")
    got = chat(client, QWEN3, stream, max_tokens=80,
               extra_body={"structured_outputs": {"regex": THINK_THEN_ANSWER}})
    assert got[:4] == (thought.strip(), answer.lstrip(), [], want.finish_reason)


@pytest.mark.parametrize("stream", [False, True])
def test_enable_thinking_false_reaches_the_template(client, local, ref, stream):
    params = SamplingParams(max_tokens=10, temperature=0.0)
    want = reference(local, ref, QWEN3, params, enable_thinking=False)
    thinking = reference(local, ref, QWEN3, params)
    assert len(want.prompt_token_ids) > len(thinking.prompt_token_ids)  # the empty block
    got = chat(client, QWEN3, stream, max_tokens=10,
               extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert got[:4] == (None, want.text, [], "length")
    if not stream:
        assert got[4].prompt_tokens == len(want.prompt_token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_r1_output_is_reasoning_until_it_closes_the_block(client, local, ref, stream):
    want = reference(local, ref, R1, SamplingParams(max_tokens=12, temperature=0.0))
    assert "</think>" not in want.text
    got = chat(client, R1, stream, max_tokens=12)
    assert got[:4] == (want.text.strip(), None, [], "length")


def test_include_reasoning_false_leaves_it_out(client):
    r = client.chat.completions.create(model=R1, messages=ASK, max_tokens=6, temperature=0,
                                       extra_body={"include_reasoning": False})
    m = r.choices[0].message
    assert getattr(m, "reasoning_content", None) is None and m.content is None


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_read_after_the_reasoning(client, local, ref, stream):
    spec = {"type": "regex", "value": THINK_THEN_CALL}
    want = reference(local, ref, QWEN3, SamplingParams(max_tokens=90, temperature=0.0,
                                                        structured_output=spec), tools=[WEATHER])
    thought, _, call = want.text.removeprefix("<think>").partition("</think>")
    obj = json.loads(call.strip().removeprefix("<tool_call>").removesuffix("</tool_call>"))
    got = chat(client, QWEN3, stream, max_tokens=90, tools=[WEATHER],
               extra_body={"structured_outputs": {"regex": THINK_THEN_CALL}})
    assert got[:4] == (thought.strip(), None, [("get_weather", json.dumps(obj["arguments"]))],
                       "tool_calls")


class _NoReasoning(Backend):
    """``inner`` with every model's reasoning_parser set to none."""

    def __init__(self, inner):
        self.inner = inner

    def models(self):
        return self.inner.models()

    def tokenizer(self, model):
        return self.inner.tokenizer(model)

    def validate(self, model, ids, params):
        return self.inner.validate(model, ids, params)

    def generate(self, model, request_id, ids, params, options=DEFAULT_OPTIONS):
        return self.inner.generate(model, request_id, ids, params, options)

    def reasoning_parser(self, model):
        return "none"


def test_reasoning_parser_none_keeps_the_thinking_in_the_content(local, ref):
    server = ServerThread(build_http_app(_NoReasoning(local), [KEY], 1 << 20))
    try:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        want = reference(local, ref, R1, SamplingParams(max_tokens=8, temperature=0.0))
        got = chat(c, R1, False, max_tokens=8)
        assert got[:2] == (None, want.text)
    finally:
        server.stop()


# -- gRPC ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stub(local):
    server = GrpcServerThread(local, api_keys=[KEY])
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.GenerationStub(ch)
    server.stop()


def grpc_generate(stub, model, **kw):
    req = pb.GenerateRequest(model=model, messages=[pb.ChatMessage(role="user", content="why?")], **kw)
    reasoning = text = ""
    for r in stub.Generate(req, metadata=MD, timeout=60):
        reasoning += r.reasoning_content
        text += r.text
        finish = r.finish_reason or None
    return reasoning, text, finish


def test_grpc_splits_the_reasoning_and_passes_template_kwargs(stub, local, ref):
    spec = {"type": "regex", "value": THINK_THEN_ANSWER}
    want = reference(local, ref, QWEN3, SamplingParams(max_tokens=80, temperature=0.0,
                                                        structured_output=spec))
    thought, _, answer = want.text.removeprefix("<think>").partition("</think>")
    params = pb.SamplingParams(max_tokens=80, temperature=0.0,
                               structured_output=pb.StructuredOutput(regex=THINK_THEN_ANSWER))
    assert grpc_generate(stub, QWEN3, params=params) == (thought.strip(), answer.lstrip(),
                                                         want.finish_reason)
    off = reference(local, ref, QWEN3, SamplingParams(max_tokens=6, temperature=0.0),
                    enable_thinking=False)
    got = grpc_generate(stub, QWEN3, params=pb.SamplingParams(max_tokens=6, temperature=0.0),
                        chat_template_kwargs='{"enable_thinking": false}')
    assert got == ("", off.text, "length")
    ask = [pb.ChatMessage(role="user", content="why?")]
    tok = stub.Tokenize(pb.TokenizeRequest(model=QWEN3, messages=ask,
                                           chat_template_kwargs='{"enable_thinking": false}'),
                        metadata=MD, timeout=30)
    assert list(tok.token_ids) == off.prompt_token_ids


@pytest.mark.parametrize("kwargs,message,param", [
    ("{", "not valid JSON", ""), ("[1]", "must be an object", ""),
    ('{"messages": 1}', "may not set", ".messages")])
def test_grpc_bad_template_kwargs_are_invalid_argument(stub, kwargs, message, param):
    with pytest.raises(grpc.RpcError) as e:
        grpc_generate(stub, QWEN3, params=pb.SamplingParams(max_tokens=2),
                      chat_template_kwargs=kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    assert dict(e.value.trailing_metadata())["splitserve-param"] == "chat_template_kwargs" + param
