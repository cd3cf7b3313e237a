"""The gRPC API on a real grpc.aio server on loopback over real engines
(LocalBackend) of tiny checkpoints: Generate streams exactly the tokens a
second engine produces, Tokenize / ListModels / health answer, every
refusal has its status code, and cancellation or an expired deadline
frees the request's KV blocks."""

import asyncio
import json
import datetime
import threading

import grpc
import pytest

from tests.fixtures.admission import AdmissionBackend
from splitserve.cluster.api.backend import Overloaded, Unavailable
from splitserve.cluster.api.grpc_api import HealthService, start_grpc_server, status_for
from splitserve.cluster.api.grpc_messages import sampling_params
from splitserve.cluster.api.proto import health_pb2, health_pb2_grpc
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.api.tool_calls import template_messages
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.api_fixtures import engines, local, make_engine, paths, refs, wait_until  # noqa: F401

KEY = "grpc-test-key"
MD = (("authorization", f"Bearer {KEY}"),)
MAX_MESSAGE = 64 << 10



class GrpcServerThread:
    """start_grpc_server on its own event loop thread; clients use it from tests."""

    def __init__(self, backend, **kw):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self.run(start_grpc_server(backend, "127.0.0.1", 0, **kw))
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self):
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def health():
    return HealthService()


@pytest.fixture(scope="module")
def server(local, health):
    s = GrpcServerThread(AdmissionBackend(local, {"slow": 1}, retry_after_s=0.4), api_keys=[KEY],
                         max_message_bytes=MAX_MESSAGE, health=health)
    yield s
    s.stop()


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return pb_grpc.GenerationStub(channel)


def idle(local, engines):
    return local.all_blocks_free() and not any(e.has_unfinished() for e in engines.values())


def generate(stub, **kw):
    return list(stub.Generate(pb.GenerateRequest(**kw), metadata=MD, timeout=60))


def code_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- results -------------------------------------------------------------------

def test_generate_streams_the_engines_tokens(stub, refs):
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2)
    ref = refs["tiny-llama"].generate(["hello world"], params)[0]
    rs = generate(stub, model="tiny-llama", text="hello world", request_id="mine",
                  params=pb.SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2))
    assert [t for r in rs for t in r.token_ids] == ref.token_ids
    assert "".join(r.text for r in rs) == ref.text
    assert [r.finish_reason for r in rs] == [""] * (len(rs) - 1) + ["length"]
    assert {r.request_id for r in rs} == {"mine"}
    last = rs[-1].usage
    assert (last.prompt_tokens, last.completion_tokens) == (len(ref.prompt_token_ids), 9)
    lps = [lp for r in rs for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == ref.token_ids
    assert [lp.logprob for lp in lps] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-4)
    assert [[t.token_id for t in lp.top] for lp in lps] == [[t for t, _ in lp.top] for lp in ref.logprobs]
    assert rs[0].timings["ingress_ttft_s"] >= rs[0].timings["ingress_prepare_s"] >= 0
    assert all(not r.timings for r in rs[1:])


def test_prompt_logprobs_come_with_the_first_response(stub, refs):
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    ref = refs["tiny-qwen"].generate(["score this prompt"], params)[0]
    rs = generate(stub, model="tiny-qwen", text="score this prompt", params=pb.SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2))
    first = rs[0].prompt_logprobs
    assert [lp.token_id for lp in first] == ref.prompt_token_ids[1:]
    assert [lp.logprob for lp in first] == pytest.approx(
        [lp.logprob for lp in ref.prompt_logprobs[1:]], abs=1e-4)
    assert [[t.token_id for t in lp.top] for lp in first] == [
        [t for t, _ in lp.top] for lp in ref.prompt_logprobs[1:]]
    assert all(not r.prompt_logprobs for r in rs[1:])
    assert [t for r in rs for t in r.token_ids] == ref.token_ids


def test_seeded_sampling_token_ids_and_chat_equal_the_engine(stub, refs):
    eng = refs["tiny-qwen"]
    sp = dict(max_tokens=8, temperature=0.9, top_p=0.95, top_k=30, min_p=0.02, seed=5,
              presence_penalty=0.4, frequency_penalty=0.2, repetition_penalty=1.1, stop_token_ids=[9],
              min_tokens=1, logit_bias={3: 6.0, 15: -100.0})
    prompt = [11, 12, 13, 200, 7]
    ref = eng.generate([prompt], SamplingParams(**sp))[0]
    rs = generate(stub, model="tiny-qwen", token_ids=pb.TokenIds(ids=prompt), params=pb.SamplingParams(**sp))
    assert [t for r in rs for t in r.token_ids] == ref.token_ids
    assert rs[-1].finish_reason == ref.finish_reason

    msgs = [{"role": "user", "content": "hi there"}]
    ids = eng.tokenizer.encode(eng.tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    ref = eng.generate([ids], SamplingParams(max_tokens=6, temperature=0.0))[0]
    rs = generate(stub, model="tiny-qwen", messages=[pb.ChatMessage(**m) for m in msgs],
                  params=pb.SamplingParams(max_tokens=6, temperature=0.0))
    assert [t for r in rs for t in r.token_ids] == ref.token_ids
    assert rs[-1].usage.prompt_tokens == len(ids)


def test_structured_output(stub, refs):
    eng = refs["tiny-qwen"]
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]},
                                               "v": {"type": "integer", "maximum": 50}},
              "required": ["k", "v"], "additionalProperties": False}
    prompt = [11, 12, 13, 200, 7]
    for so, spec in [(pb.StructuredOutput(json_schema=json.dumps(schema)),
                      {"type": "json", "value": json.dumps(schema)}),
                     (pb.StructuredOutput(regex="[xyz]{4}"), {"type": "regex", "value": "[xyz]{4}"}),
                     (pb.StructuredOutput(choice=pb.Choices(choices=["up", "down"])), None)]:
        rs = generate(stub, model="tiny-qwen", token_ids=pb.TokenIds(ids=prompt),
                      params=pb.SamplingParams(max_tokens=40, temperature=0.0, structured_output=so))
        text = "".join(r.text for r in rs)
        assert rs[-1].finish_reason == "stop"
        if spec is not None:
            ref = eng.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0,
                                                        structured_output=spec))[0]
            assert [t for r in rs for t in r.token_ids] == ref.token_ids
        else:
            assert text in ("up", "down")
    rs = generate(stub, model="tiny-qwen", text="x", params=pb.SamplingParams(
        max_tokens=100, seed=2, structured_output=pb.StructuredOutput(json_object=True)))
    if rs[-1].finish_reason == "stop":
        assert isinstance(json.loads("".join(r.text for r in rs)), dict)


WEATHER = pb.Tool(name="get_weather", description="Weather of a city", parameters=json.dumps({
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"], "additionalProperties": False}))
HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}"\}\}\n'
               r'</tool_call>')


def test_tool_calls(stub, paths):
    # the default model ("slow"): its context holds the tool definitions
    eng = make_engine(paths["slow"], "slow")
    tools = [{"type": "function", "function": {"name": WEATHER.name, "description": WEATHER.description,
                                               "parameters": json.loads(WEATHER.parameters)}}]
    ask = [{"role": "user", "content": "weather?"}]

    def ref(msgs, **sp):
        text = eng.tokenizer.apply_chat_template(template_messages(msgs), tools=tools)
        ids = eng.tokenizer.encode(text, add_special_tokens=False)
        return eng.generate([ids], SamplingParams(temperature=0.0, **sp))[0]

    def call(msgs, **kw):
        return generate(stub, model="slow", messages=[pb.ChatMessage(**m) for m in msgs], tools=[WEATHER],
                        params=pb.SamplingParams(max_tokens=60, temperature=0.0, **kw.pop("sp", {})), **kw)

    # a named function: the constrained output is the call's arguments, streamed
    want = ref(ask, max_tokens=60, structured_output={"type": "json", "value": WEATHER.parameters})
    rs = call(ask, tool_function="get_weather")
    deltas = [c for r in rs for c in r.tool_calls]
    assert deltas[0].id.startswith("call_") and deltas[0].name == "get_weather"
    assert {c.index for c in deltas} == {0} and all(not c.id for c in deltas[1:])
    assert "".join(c.arguments for c in deltas) == want.text and set(json.loads(want.text)) == {"city"}
    assert "".join(r.text for r in rs) == "" and rs[-1].finish_reason == "stop"
    assert [t for r in rs for t in r.token_ids] == want.token_ids
    # auto: a call the model writes (made to, by a regex) is parsed out of the text
    rs = call(ask, sp={"structured_output": pb.StructuredOutput(regex=HERMES_CALL)})
    (c,) = [c for r in rs for c in r.tool_calls]
    assert c.name == "get_weather" and set(json.loads(c.arguments)) == {"city"}
    assert "".join(r.text for r in rs) == "" and rs[-1].finish_reason == "tool_calls"
    # a conversation carrying a call and its result renders as the template says
    msgs = [*ask, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    want = ref(msgs, max_tokens=5)
    rs = generate(stub, model="slow", tools=[WEATHER], params=pb.SamplingParams(max_tokens=5, temperature=0.0),
                  messages=[pb.ChatMessage(role="user", content="weather?"),
                            pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(
                                id="call_1", name="get_weather", arguments='{"city": "oslo"}')]),
                            pb.ChatMessage(role="tool", tool_call_id="call_1", content="sunny")])
    assert [t for r in rs for t in r.token_ids] == want.token_ids
    assert "".join(r.text for r in rs) == want.text


def test_concurrent_streams_on_two_models(server, refs):
    async def main():
        async with grpc.aio.insecure_channel(server.target) as ch:
            s = pb_grpc.GenerationStub(ch)

            async def one(model, text):
                req = pb.GenerateRequest(model=model, text=text, params=pb.SamplingParams(
                    max_tokens=7, temperature=0.0))
                return [t async for r in s.Generate(req, metadata=MD) for t in r.token_ids]

            return await asyncio.gather(*[one(m, t) for m, t in JOBS])

    JOBS = [("tiny-llama", "a b"), ("tiny-qwen", "a b"), ("tiny-qwen", "c"), ("tiny-llama", "c d e")]
    got = asyncio.run(main())
    want = [refs[m].generate([t], SamplingParams(max_tokens=7, temperature=0.0))[0].token_ids for m, t in JOBS]
    assert got == want


def test_tokenize_list_models_and_health(stub, channel, refs, health, server):
    tok = refs["tiny-llama"].tokenizer
    r = stub.Tokenize(pb.TokenizeRequest(model="tiny-llama", text="hello there"), metadata=MD)
    assert list(r.token_ids) == tok.encode("hello there") and r.max_model_len == 256
    r = stub.Tokenize(pb.TokenizeRequest(model="tiny-llama", text="hello", add_special_tokens=False),
                      metadata=MD)
    assert list(r.token_ids) == tok.encode("hello", add_special_tokens=False)
    r = stub.Tokenize(pb.TokenizeRequest(model="tiny-llama", messages=[pb.ChatMessage(role="user", content="yo")]),
                      metadata=MD)
    assert r.prompt == tok.apply_chat_template([{"role": "user", "content": "yo"}])
    assert list(r.token_ids) == tok.encode(r.prompt, add_special_tokens=False)
    # the developer role is rendered as system, as over HTTP
    r = stub.Tokenize(pb.TokenizeRequest(model="tiny-llama", messages=[
        pb.ChatMessage(role="developer", content="be brief"), pb.ChatMessage(role="user", content="yo")]),
        metadata=MD)
    assert r.prompt == tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": "yo"}])
    r = stub.Tokenize(pb.TokenizeRequest(model="tiny-llama", messages=[pb.ChatMessage(role="user", content="yo")],
                                         tools=[pb.Tool(name="f")]), metadata=MD)
    assert r.prompt == tok.apply_chat_template([{"role": "user", "content": "yo"}], tools=[
        {"type": "function", "function": {"name": "f"}}])
    for bad, param in [(dict(text="yo"), "tools"),
                       (dict(messages=[pb.ChatMessage(role="user", content="yo")]), "tools[0].name")]:
        err = code_of(lambda: stub.Tokenize(pb.TokenizeRequest(
            model="tiny-llama", tools=[pb.Tool(name="a b")], **bad), metadata=MD))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(f"{param}: ")
    models = stub.ListModels(pb.ListModelsRequest(), metadata=MD).models
    assert [(m.name, m.max_model_len) for m in models] == [("tiny-llama", 256), ("tiny-qwen", 256), ("slow", 2048)]

    h = health_pb2_grpc.HealthStub(channel)
    for service in ("", "splitserve.v1.Generation"):
        assert h.Check(health_pb2.HealthCheckRequest(service=service), metadata=MD).status == \
            health_pb2.HealthCheckResponse.SERVING
    err = code_of(lambda: h.Check(health_pb2.HealthCheckRequest(service="nope"), metadata=MD))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    watch = h.Watch(health_pb2.HealthCheckRequest(service=""), metadata=MD)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    server.loop.call_soon_threadsafe(health.set_serving, False)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert h.Check(health_pb2.HealthCheckRequest(), metadata=MD).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    server.loop.call_soon_threadsafe(health.set_serving, True)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


# -- status codes ----------------------------------------------------------------

P = pb.SamplingParams
HI = [pb.ChatMessage(role="user", content="hi")]


@pytest.mark.parametrize("kw,param", [
    (dict(text="hi", params=P(temperature=-1.0)), "temperature"),
    (dict(text="hi", params=P(top_p=0.0)), "top_p"),
    (dict(text="hi", params=P(max_tokens=0)), "max_tokens"),
    (dict(text="hi", params=P(max_tokens=300)), "max_tokens"),
    (dict(text="hi", params=P(n=2)), "n"),
    (dict(text="hi", params=P(stop=[""])), "stop"),
    (dict(text="hi", params=P(seed=2**63)), "seed"),
    (dict(text="hi", params=P(logprobs=21)), "logprobs"),
    (dict(text="hi", params=P(prompt_logprobs=21)), "prompt_logprobs"),
    (dict(text="hi", params=P(logit_bias={5: 100.5})), "logit_bias"),
    (dict(text="hi", params=P(logit_bias={100000: 1.0})), "logit_bias"),
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(regex="(a"))),
     "structured_output"),
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(json_schema="[1]"))),
     "structured_output"),
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(json_object=False))),
     "structured_output"),
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(choice=pb.Choices()))),
     "structured_output"),
    (dict(text=""), "prompt"),
    (dict(), "prompt"),
    (dict(token_ids=pb.TokenIds(ids=list(range(3, 303)))), "prompt"),
    (dict(token_ids=pb.TokenIds(ids=[1, 100000])), "prompt"),
    (dict(messages=[pb.ChatMessage(role="user", content="x " * 1000)]), "messages"),
    (dict(messages=[pb.ChatMessage(role="wizard", content="hi")]), "messages[0].role"),
    (dict(text="hi", messages=[pb.ChatMessage(role="user", content="hi")]), "messages"),
    (dict(text="hi", tools=[WEATHER]), "tools"),
    (dict(messages=HI, tools=[pb.Tool(name="a b")]), "tools[0].name"),
    (dict(messages=HI, tools=[pb.Tool(name="f", parameters="{x")]), "tools[0].parameters"),
    (dict(messages=HI, tools=[pb.Tool(name="f", parameters='"s"')]), "tools[0].parameters"),
    # JSON text is parsed as strictly as the HTTP body: no NaN / Infinity, no repeated key
    (dict(messages=HI, tools=[pb.Tool(name="f", parameters='{"type": "object", "maximum": NaN}')]),
     "tools[0].parameters"),
    (dict(messages=HI, tools=[pb.Tool(name="f", parameters='{"type": "object", "type": "string"}')]),
     "tools[0].parameters"),
    (dict(messages=HI, tools=[pb.Tool(name="f", parameters='{"type": "object", "properties": '
                                      '{"x": {"type": "integer", "type": "string"}}}')]),
     "tools[0].parameters"),
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(
        json_schema='{"type": "number", "minimum": -Infinity}'))), "structured_output"),
    (dict(text="hi", params=P(structured_output=pb.StructuredOutput(
        json_schema='{"type": "object", "type": "array"}'))), "structured_output"),
    (dict(messages=HI, chat_template_kwargs='{"enable_thinking": false, "enable_thinking": true}'),
     "chat_template_kwargs"),
    (dict(messages=HI, chat_template_kwargs='{"x": Infinity}'), "chat_template_kwargs"),
    (dict(messages=HI, chat_template_kwargs='{"x": -1e400}'), "chat_template_kwargs"),
    (dict(messages=HI, chat_template_kwargs="{x"), "chat_template_kwargs"),
    (dict(messages=HI, tool_choice="required"), "tool_choice"),
    (dict(messages=HI, tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    (dict(messages=HI, tools=[WEATHER], tool_function="nope"), "tool_function"),
    (dict(messages=HI, tools=[WEATHER], tool_function="get_weather", tool_choice="auto"), "tool_function"),
    (dict(messages=HI, tools=[WEATHER], tool_choice="required",
          params=P(structured_output=pb.StructuredOutput(json_object=True))), "tool_choice"),
    (dict(messages=[pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(name="f", arguments="{x")])]),
     "messages[0].tool_calls[0].arguments"),
    # every string the template may render counts toward the chat's characters, before rendering
    (dict(messages=[pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(name="f" * 5000)])]), "messages"),
    (dict(messages=HI, tools=[pb.Tool(name="f", description="x" * 5000)]), "tools"),
    (dict(messages=HI, chat_template_kwargs=json.dumps({"a": "x" * 5000})), "chat_template_kwargs"),
])
def test_invalid_arguments_name_the_field(stub, local, engines, kw, param):
    err = code_of(lambda: generate(stub, model="tiny-llama", **kw))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{param}: ")
    assert ("splitserve-param", param) in err.trailing_metadata()
    assert idle(local, engines)


def test_unknown_model_is_not_found(stub):
    for call in (lambda: generate(stub, model="gpt-9", text="hi"),
                 lambda: stub.Tokenize(pb.TokenizeRequest(model="gpt-9", text="hi"), metadata=MD)):
        err = code_of(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "tiny-llama" in err.details()


@pytest.mark.parametrize("md", [(), (("authorization", "Bearer nope"),), (("x-api-key", "nope"),),
                                (("authorization", KEY),)])
def test_api_key_is_required_on_every_method(channel, md):
    stub = pb_grpc.GenerationStub(channel)
    calls = [lambda: list(stub.Generate(pb.GenerateRequest(model="tiny-llama", text="hi"), metadata=md)),
             lambda: stub.Tokenize(pb.TokenizeRequest(model="tiny-llama", text="hi"), metadata=md),
             lambda: stub.ListModels(pb.ListModelsRequest(), metadata=md),
             lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), metadata=md),
             lambda: next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                                     metadata=md))]
    for call in calls:
        assert code_of(call).code() == grpc.StatusCode.UNAUTHENTICATED
    ok = pb_grpc.GenerationStub(channel).ListModels(pb.ListModelsRequest(), metadata=(("x-api-key", KEY),))
    assert len(ok.models) == 3


def test_oversized_message_is_resource_exhausted_and_server_stays_up(stub):
    err = code_of(lambda: generate(stub, model="tiny-llama", text="a" * (MAX_MESSAGE + 100)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(generate(stub, model="tiny-llama", text="a", params=P(max_tokens=2))) == 2


SLOW = dict(model="slow", text="hello", params=P(max_tokens=2000, ignore_eos=True, temperature=0.0))


def test_overload_is_resource_exhausted_with_retry_after(stub, local, engines):
    first = stub.Generate(pb.GenerateRequest(**SLOW), metadata=MD)
    next(first)
    err = code_of(lambda: generate(stub, model="slow", text="x", params=P(max_tokens=2)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "1") in err.trailing_metadata()
    assert len(generate(stub, model="tiny-qwen", text="x", params=P(max_tokens=2))) == 2
    first.cancel()
    assert wait_until(lambda: idle(local, engines), timeout=5)


def test_cancel_frees_blocks(stub, local, engines):
    call = stub.Generate(pb.GenerateRequest(**SLOW), metadata=MD)
    for _ in range(3):
        next(call)
    assert engines["slow"].has_unfinished() and not local.all_blocks_free()
    call.cancel()
    assert code_of(lambda: next(call)).code() == grpc.StatusCode.CANCELLED
    assert wait_until(lambda: idle(local, engines), timeout=5)


def test_deadline_exceeded_cancels_the_generation(stub, local, engines):
    call = stub.Generate(pb.GenerateRequest(**SLOW), metadata=MD, timeout=1.5)
    assert code_of(lambda: list(call)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: idle(local, engines), timeout=5)


def test_status_mapping_of_backend_errors():
    code, _, trailing = status_for(Unavailable("router down", 2.2))
    assert (code, trailing) == (grpc.StatusCode.UNAVAILABLE, (("retry-after", "3"),))
    code, _, trailing = status_for(Overloaded("busy", 0.1))
    assert (code, trailing) == (grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "1"),))
    assert status_for(RuntimeError("bug"))[0] == grpc.StatusCode.INTERNAL


def test_unset_sampling_fields_take_the_defaults():
    assert sampling_params(pb.SamplingParams()) == SamplingParams()
    got = sampling_params(pb.SamplingParams(temperature=0.0, top_k=0, logprobs=0, skip_special_tokens=False))
    assert (got.temperature, got.top_k, got.logprobs, got.skip_special_tokens) == (0.0, 0, 0, False)
    # the speculative decoding opt-out: unset speculates (where the model does)
    assert sampling_params(pb.SamplingParams()).speculative is True
    assert sampling_params(pb.SamplingParams(speculative=False)).speculative is False


def _self_signed(tmp_path):
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_pem


def test_tls(local, tmp_path):
    cert_pem = _self_signed(tmp_path)
    s = GrpcServerThread(local, api_keys=[], tls_cert=str(tmp_path / "cert.pem"),
                         tls_key=str(tmp_path / "key.pem"))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert_pem)
        with grpc.secure_channel(s.target, creds,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
            assert len(pb_grpc.GenerationStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models) == 3
        with grpc.insecure_channel(s.target) as ch:
            err = code_of(lambda: pb_grpc.GenerationStub(ch).ListModels(pb.ListModelsRequest(), timeout=5))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()
    with pytest.raises(ValueError, match="both"):
        asyncio.run(start_grpc_server(local, "127.0.0.1", 0, [], tls_cert=str(tmp_path / "cert.pem")))
