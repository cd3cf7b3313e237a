"""Probes, model cards, /tokenize and /detokenize, and /metrics on a real
uvicorn server on loopback over real engines (LocalBackend) of tiny
checkpoints; the gRPC health service following the same readiness."""

import asyncio

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import splitserve
from splitserve.cluster.api.backend import LocalBackend
from splitserve.cluster.api.openai_api import build_http_app
from splitserve.cluster.api.proto import health_pb2, health_pb2_grpc
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.config import ObservabilitySpec
from splitserve.cluster.observability.metric_defs import METRICS
from splitserve.engine.default_model import CHAT_TEMPLATE
from splitserve.engine.limits import max_prompt_chars
from tests.integration.api_fixtures import make_engine
from tests.integration.test_grpc_api import GrpcServerThread
from tests.integration.test_openai_api import INVALID, ServerThread, assert_error

KEY = "sk-ops-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MD = (("authorization", f"Bearer {KEY}"),)
MAX_BODY = 64 << 10
A, B = "ops-llama", "ops-qwen"
# the checkpoint's template, plus a variable only chat_template_kwargs sets
TEMPLATE = CHAT_TEMPLATE + "{% if flavour is defined %}[{{ flavour }}]{% endif %}"


@pytest.fixture(scope="module")
def engines(tiny_checkpoints):
    engines = {A: make_engine(tiny_checkpoints["llama"], A),
               B: make_engine(tiny_checkpoints["qwen2"], B)}
    engines[A].tokenizer.chat_template = TEMPLATE
    return engines


@pytest.fixture(scope="module")
def backend(engines):
    b = LocalBackend(engines)
    yield b
    asyncio.run(b.close())


@pytest.fixture(scope="module")
def url(backend):
    server = ServerThread(build_http_app(backend, [KEY], MAX_BODY))
    yield server.url
    server.stop()


def get(url, path, headers=AUTH):
    return httpx.get(f"{url}{path}", headers=headers, timeout=30)


def post(url, path, body, headers=AUTH):
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30)


# -- probes and model cards --------------------------------------------------------

def test_probes_version_and_model_cards(url):
    assert get(url, "/health").json() == {"status": "ok"}
    r = get(url, "/ready")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "models": {A: {"colocated": 1}, B: {"colocated": 1}}}
    assert get(url, "/version").json() == {"version": splitserve.__version__}
    cards = get(url, "/v1/models").json()["data"]
    assert get(url, f"/v1/models/{A}").json() == cards[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    m = client.models.retrieve(B)
    assert (m.id, m.object, m.owned_by) == (B, "model", "splitserve")
    for missing in ("gpt-9", "org/model-x"):
        assert_error(get(url, f"/v1/models/{missing}"), 404, INVALID, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_ready_and_grpc_health_go_not_ready_when_an_engine_stops(tiny_checkpoints):
    """Readiness, not liveness: /health stays 200; /ready is 503 naming the
    pool, and gRPC health reports NOT_SERVING."""
    backend = LocalBackend({"solo": make_engine(tiny_checkpoints["llama"], "solo")})
    http = ServerThread(build_http_app(backend, [KEY], MAX_BODY))
    rpc = GrpcServerThread(backend, api_keys=[KEY])
    channel = grpc.insecure_channel(rpc.target)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        assert get(http.url, "/ready").status_code == 200
        for service in ("", "splitserve.v1.Generation"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), metadata=MD).status \
                == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), metadata=MD)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        asyncio.run(backend.close())  # the engine thread stops
        r = get(http.url, "/ready")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "not_ready" and body["models"] == {"solo": {"colocated": 0}}
        assert body["missing"] == [{"model": "solo", "pool": "colocated"}]
        assert body["error"]["code"] == "not_ready" and "colocated" in body["error"]["message"]
        assert get(http.url, "/health").status_code == 200
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=MD).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    finally:
        channel.close()
        rpc.stop()
        http.stop()


# -- tokenize / detokenize -------------------------------------------------------

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def tokenize(url, **body):
    r = post(url, "/tokenize", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_tokenize_prompt_matches_the_engine_tokenizer(url, engines):
    tok = engines[A].tokenizer
    text = "the quick brown fox jumps"
    r = tokenize(url, model=A, prompt=text)
    assert r == {"count": len(tok.encode(text)), "max_model_len": 256, "tokens": tok.encode(text),
                 "token_strs": None}
    r = tokenize(url, model=A, prompt=text, add_special_tokens=False, return_token_strs=True)
    assert r["tokens"] == tok.encode(text, add_special_tokens=False)
    assert r["token_strs"] == [tok.id_to_token(i) for i in r["tokens"]]
    assert post(url, "/detokenize", {"model": A, "tokens": r["tokens"]}).json() == {"prompt": text}
    ids = tok.encode(text)  # with BOS: detokenize keeps special tokens, as vLLM does
    assert post(url, "/detokenize", {"model": A, "tokens": ids}).json() == \
        {"prompt": tok.decode(ids, skip_special_tokens=False)}


def test_tokenize_chat_matches_the_chat_template(url, engines):
    tok = engines[A].tokenizer
    cases = [
        ({}, dict()),
        ({"add_generation_prompt": False}, dict(add_generation_prompt=False)),
        ({"tools": TOOLS}, dict(tools=TOOLS)),
        ({"chat_template_kwargs": {"flavour": "mint"}}, dict(flavour="mint")),
    ]
    for extra, kw in cases:
        text = tok.apply_chat_template(MSGS, **kw)
        r = tokenize(url, model=A, messages=MSGS, **extra)
        assert r["tokens"] == tok.encode(text, add_special_tokens=False), extra
        assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    assert "[mint]" in tok.apply_chat_template(MSGS, flavour="mint")
    r = tokenize(url, model=A, messages=MSGS, add_special_tokens=True)
    assert r["tokens"] == tok.encode(tok.apply_chat_template(MSGS), add_special_tokens=True)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tokenize(url, model=B, messages=parts)["tokens"] == engines[B].tokenizer.encode(
        engines[B].tokenizer.apply_chat_template([{"role": "user", "content": "a\nb"}]),
        add_special_tokens=False)


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("/tokenize", {"prompt": "hi"}, 400, "model"),
    ("/tokenize", {"model": A, "prompt": 7}, 400, "prompt"),
    ("/tokenize", {"model": A, "prompt": "hi", "temperature": 0}, 400, "temperature"),
    ("/tokenize", {"model": A, "prompt": "x" * (max_prompt_chars(256) + 1)}, 400, "prompt"),
    ("/tokenize", {"model": A, "messages": [{"role": "user", "content": "x" * (max_prompt_chars(256) + 1)}]},
     400, "messages"),
    ("/tokenize", {"model": A, "messages": []}, 400, "messages"),
    ("/tokenize", {"model": A, "messages": MSGS, "chat_template_kwargs": {"messages": []}}, 400,
     "chat_template_kwargs.messages"),
    ("/tokenize", {"model": A, "messages": MSGS, "chat_template": "{{ 7 }}"}, 400, "chat_template"),
    ("/tokenize", {"model": A, "messages": MSGS, "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/tokenize", {"model": A, "messages": MSGS, "tools": [{"type": "function", "function": {}}]},
     400, "tools[0].function.name"),
    ("/tokenize", {"model": A, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/detokenize", {"model": A, "tokens": [5, 512]}, 400, "tokens[1]"),
    ("/detokenize", {"model": A, "tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"model": A, "tokens": [5] * 257}, 400, "tokens"),
    ("/detokenize", {"model": A, "tokens": "5 6"}, 400, "tokens"),
    ("/detokenize", {"model": "gpt-9", "tokens": [5]}, 404, "model"),
])
def test_tokenize_refusals_name_the_field(url, path, body, status, param):
    r = post(url, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_tokenize_body_limits_and_auth(url):
    r = httpx.post(f"{url}/tokenize", content=b'{"model": "' + b"x" * MAX_BODY + b'"}',
                   headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 413, INVALID, None, "request_too_large")
    r = httpx.post(f"{url}/tokenize", content=b"\xff", headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 400, INVALID, None, "invalid_encoding")
    for path in ("/tokenize", "/detokenize"):
        assert post(url, path, {"model": A, "prompt": "hi"}, headers={}).status_code == 401


# -- /metrics ---------------------------------------------------------------------

def scrape(url, headers=AUTH) -> dict:
    """family name -> (type, {(sample name, labels without model): value}) for model A."""
    r = get(url, "/metrics", headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        values = {}
        for s in fam.samples:
            model = s.labels.get("model", s.labels.get("model_name"))
            if model == A and not s.name.endswith("_created"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                      if k not in ("model", "model_name")))
                values[(s.name, labels)] = s.value
        out[fam.name] = (fam.type, values)
    return out


def value(fams, family, sample=None, **labels) -> float:
    return fams.get(family, (None, {}))[1].get((sample or family, tuple(sorted(labels.items()))), 0.0)


REPLICA = {"replica": f"local:{A}", "role": "colocated"}


def test_metrics_scrape_moves_with_traffic(url, engines):
    before = scrape(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    long = " ".join(["one two three four five six seven"] * 6)  # a few full KV blocks
    prompts = [long, "four five", long]
    usage = [client.completions.create(model=A, prompt=p, max_tokens=4, temperature=0).usage
             for p in prompts]
    stopped = client.chat.completions.create(model=A, messages=MSGS, max_tokens=3, temperature=0)
    after = scrape(url)

    def delta(family, sample=None, **labels):
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    n = len(prompts) + 1
    assert delta("splitserve_requests", "splitserve_requests_total", outcome="finished") == n
    assert delta("splitserve_finished_requests", "splitserve_finished_requests_total",
                 finish_reason=stopped.choices[0].finish_reason) >= 1
    assert sum(delta("splitserve_finished_requests", "splitserve_finished_requests_total",
                     finish_reason=r) for r in ("stop", "length")) == n
    assert delta("splitserve_output_tokens", "splitserve_output_tokens_total") == \
        sum(u.completion_tokens for u in usage) + stopped.usage.completion_tokens
    assert delta("splitserve_prompt_tokens", "splitserve_prompt_tokens_total") == \
        sum(u.prompt_tokens for u in usage) + stopped.usage.prompt_tokens
    assert delta("splitserve_ttft_seconds", "splitserve_ttft_seconds_count") == n
    assert delta("splitserve_request_output_tokens", "splitserve_request_output_tokens_sum") == \
        sum(u.completion_tokens for u in usage) + stopped.usage.completion_tokens
    assert delta("splitserve_prefix_cache_queries", "splitserve_prefix_cache_queries_total",
                 **REPLICA) >= n
    assert delta("splitserve_prefix_cache_hits", "splitserve_prefix_cache_hits_total",
                 **REPLICA) >= 1  # the repeated prompt
    cached = sum((u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0
                 for u in usage)
    assert cached >= 16 and delta("splitserve_cached_prompt_tokens",
                                  "splitserve_cached_prompt_tokens_total") == cached
    # types and labels as declared; the replica series of an idle engine
    for name, d in METRICS.items():
        if name in after:
            assert after[name][0] == d.kind, name
    # a colocated engine never hands off, retries or falls back: those stay unrecorded
    recorded = {"splitserve_ttft_seconds", "splitserve_tpot_seconds", "splitserve_itl_seconds",
                "splitserve_e2e_seconds", "splitserve_request_phase_seconds",
                "splitserve_requests", "splitserve_finished_requests", "splitserve_prompt_tokens",
                "splitserve_cached_prompt_tokens", "splitserve_output_tokens",
                "splitserve_request_prompt_tokens", "splitserve_request_output_tokens"}
    replica = {name for name, d in METRICS.items() if d.source == "replica"}
    assert recorded | replica <= set(after)
    assert value(after, "splitserve_kv_cache_blocks", **REPLICA) == 256
    assert value(after, "splitserve_kv_cache_usage_ratio", **REPLICA) == 0.0
    assert value(after, "splitserve_running_seqs", **REPLICA) == 0
    assert not any(name.startswith("vllm:") for name in after)
    assert not any(d.source == "autoscaler" and name in after for name, d in METRICS.items())


def test_vllm_names_and_open_routes(backend):
    app = build_http_app(backend, [KEY], MAX_BODY, observability=ObservabilitySpec(
        unauthenticated_routes=["health", "metrics"], vllm_metric_names=True))
    server = ServerThread(app)
    try:
        for path in ("/health", "/ready", "/version", "/metrics"):
            assert get(server.url, path, headers={}).status_code == 200, path
        for path in ("/v1/models", f"/v1/models/{A}", "/metrics/x", "/healthz"):
            assert get(server.url, path, headers={}).status_code == 401, path
        assert post(server.url, "/tokenize", {"model": A, "prompt": "hi"}, headers={}).status_code == 401
        httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=30,
                   json={"model": A, "prompt": "hi", "max_tokens": 2})
        fams = scrape(server.url, headers={})
        pairs = [("vllm:time_to_first_token_seconds", "splitserve_ttft_seconds", "_count"),
                 ("vllm:e2e_request_latency_seconds", "splitserve_e2e_seconds", "_sum"),
                 ("vllm:prompt_tokens", "splitserve_prompt_tokens", "_total"),
                 ("vllm:generation_tokens", "splitserve_output_tokens", "_total")]
        for vllm, ours, suffix in pairs:
            assert fams[vllm][0] == fams[ours][0]
            assert value(fams, vllm, vllm + suffix) == value(fams, ours, ours + suffix) > 0
        assert value(fams, "vllm:num_requests_waiting", **REPLICA) == 0
        assert value(fams, "vllm:kv_cache_usage_perc", **REPLICA) == 0
        assert ("vllm:request_success_total", (("finished_reason", "length"),)) in \
            fams["vllm:request_success"][1]
    finally:
        server.stop()


def test_metrics_need_the_key_by_default(url):
    assert_error(get(url, "/metrics", headers={}), 401, "authentication_error", None, "invalid_api_key")
    for path in ("/ready", "/version", "/v1/models/x"):
        assert get(url, path, headers={}).status_code == 401


def test_grpc_health_open_only_when_configured(backend):
    for open_health, want in ((False, grpc.StatusCode.UNAUTHENTICATED), (True, None)):
        rpc = GrpcServerThread(backend, api_keys=[KEY], open_health=open_health)
        channel = grpc.insecure_channel(rpc.target)
        try:
            health = health_pb2_grpc.HealthStub(channel)
            try:
                status = health.Check(health_pb2.HealthCheckRequest()).status
                assert want is None and status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as e:
                assert e.code() == want
            with pytest.raises(grpc.RpcError) as err:  # everything else keeps needing the key
                pb_grpc.GenerationStub(channel).ListModels(pb.ListModelsRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            channel.close()
            rpc.stop()
