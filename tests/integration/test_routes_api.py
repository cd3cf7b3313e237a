"""Routes at the client APIs: real engines on two tiny checkpoints behind a
LocalBackend, the HTTP API (official openai client) and the gRPC API on
loopback. A route names its variant in the response header / initial
metadata, echoes its own name in ``model``, sticks a client key to one
variant and reports each request's outcome."""

import asyncio
import random

import grpc
import httpx
import openai
import pytest

from splitserve.cluster.api.backend import LocalBackend
from splitserve.cluster.api.openai_api import build_http_app
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.api.routing import VARIANT_HEADER
from splitserve.router.route_messages import RouteTable, RouteWeights
from tests.integration.api_fixtures import KEY, ServerThread, make_engine
from tests.integration.test_grpc_api import GrpcServerThread
from tests.fixtures.routing import RecordingRouting

VARIANTS = ("tiny-llama", "tiny-qwen")


@pytest.fixture(scope="module")
def backend(tiny_checkpoints):
    engines = {"tiny-llama": make_engine(tiny_checkpoints["llama"], "tiny-llama"),
               "tiny-qwen": make_engine(tiny_checkpoints["qwen2"], "tiny-qwen")}
    b = LocalBackend(engines)
    table = RouteTable(1, (RouteWeights("chat", VARIANTS, (50.0, 50.0), "x-splitserve-user"),
                           RouteWeights("ghost", ("not-served",), (1.0,))))
    b.routing = RecordingRouting(table, served=set(engines), rng=random.Random(11))
    yield b
    asyncio.run(b.close())


@pytest.fixture(scope="module")
def url(backend):
    server = ServerThread(build_http_app(backend, [KEY], 1 << 20))
    yield server.url
    server.stop()


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def complete(client, **kw):
    raw = client.completions.with_raw_response.create(
        model="chat", prompt="hello there", max_tokens=3, temperature=0, **kw)
    return raw.headers.get(VARIANT_HEADER), raw.parse()


def test_routes_are_listed_as_models_and_unservable_ones_are_not(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-llama", "tiny-qwen", "chat"]
    assert client.models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ghost", prompt="x", max_tokens=1)


def test_the_variant_is_named_and_the_route_echoed(client, backend):
    variant, out = complete(client, user="alice")
    assert variant in VARIANTS and out.model == "chat"
    # the answer is the variant's own: the same as asking it directly
    direct = client.completions.create(model=variant, prompt="hello there", max_tokens=3,
                                       temperature=0)
    assert out.choices[0].text == direct.choices[0].text
    assert direct.model == variant


def test_a_client_key_sticks_and_the_header_wins_over_user(client):
    by_user = {u: complete(client, user=u)[0] for u in ("u1", "u2", "u3", "u4", "u5", "u6")}
    for u, v in by_user.items():
        assert complete(client, user=u)[0] == v
    assert set(by_user.values()) == set(VARIANTS)  # 6 keys on a 50/50 split: 1 in 32 to fail
    # the key header, when sent, is the key: the user field is then ignored
    for u in by_user:
        v = complete(client, user="someone-else", extra_headers={"x-splitserve-user": u})[0]
        assert v == by_user[u]


def test_without_a_key_each_request_is_drawn(client):
    seen = {complete(client)[0] for _ in range(24)}
    assert seen == set(VARIANTS)  # a seeded draw; 2**-23 to fail on a fair split


def test_streams_carry_the_header_and_the_route_name(url):
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0, "stream": True, "user": "streamer"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers[VARIANT_HEADER] in VARIANTS
        chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and all('"model":"chat"' in c for c in chunks)


def test_responses_api_echoes_the_route(url):
    r = httpx.post(f"{url}/v1/responses", json={"model": "chat", "input": "hi",
                                                 "max_output_tokens": 3, "user": "r1"},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "chat" and r.headers[VARIANT_HEADER] in VARIANTS


def test_outcomes_are_reported_per_variant(client, backend):
    backend.routing.outcomes.clear()
    variant, _ = complete(client, user="counted")
    o = backend.routing.outcomes[-1]
    assert (o.route, o.variant, o.ok) == ("chat", variant, True)
    assert o.ttft_s >= 0 and o.tpot_s >= 0  # 3 tokens: a TPOT too
    # a client error says nothing about the variant: no outcome
    n = len(backend.routing.outcomes)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="chat", prompt="x", max_tokens=10 ** 6, user="counted")
    assert len(backend.routing.outcomes) == n


def test_route_metrics_are_labelled_by_variant(url, client):
    variant, _ = complete(client, user="metrics")
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert f'splitserve_route_requests_total{{outcome="ok",route="chat",variant="{variant}"}}' \
        in text
    assert 'splitserve_route_weight{route="chat",variant="tiny-qwen"} 0.5' in text


def test_grpc_names_the_variant_in_initial_metadata(backend):
    server = GrpcServerThread(backend, api_keys=[KEY])
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.GenerationStub(ch)

            def generate(key):
                md = [("authorization", f"Bearer {KEY}"), ("x-splitserve-user", key)]
                call = stub.Generate(pb.GenerateRequest(
                    model="chat", text="hello", params=pb.SamplingParams(max_tokens=2)),
                    metadata=md)
                variant = dict(call.initial_metadata())[VARIANT_HEADER]
                outs = list(call)
                assert outs[-1].finish_reason
                return variant

            by_key = {k: generate(k) for k in ("g1", "g2", "g3", "g4", "g5", "g6")}
            assert all(generate(k) == v for k, v in by_key.items())
            assert set(by_key.values()) == set(VARIANTS)
            models = stub.ListModels(pb.ListModelsRequest(),
                                     metadata=[("authorization", f"Bearer {KEY}")])
            assert [m.name for m in models.models] == ["tiny-llama", "tiny-qwen", "chat"]
    finally:
        server.stop()
