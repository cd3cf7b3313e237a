"""The whole cluster on a real local Ray node: ingress (HTTP via Serve's
proxy, gRPC), router, prefill and decode pools for two models. Clients are
the official openai package and the generated gRPC stubs."""


import grpc
import pytest
import ray
from openai import OpenAI

from splitserve.cluster.serve import app
from splitserve.cluster.config import parse_config
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.pd_harness import make_engine
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port

KEY = "sk-e2e-test"


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    llama, qwen = tiny_checkpoints["llama"], tiny_checkpoints["qwen3"]
    http, grpc_port = free_port(), free_port()
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    cfg = parse_config({
        "models": [
            {"model": {"name": "llama", "path": str(llama), "num_blocks": 128, "block_size": 4},
             "prefill": pool, "decode": pool},
            {"model": {"name": "qwen", "path": str(qwen), "num_blocks": 128, "block_size": 4},
             "mode": "colocated", "decode": pool},
        ],
        "router": {"local_prefill_max_tokens": 0},
        "auth": {"api_keys": [KEY], "cluster_token": "e2e-token"},
        "endpoints": {"http_port": http, "grpc_port": grpc_port},
    })
    with local_ray(num_cpus=4):
        app.deploy(cfg, wait_s=180)
        yield cfg, {"llama": llama, "qwen": qwen}


def test_openai_client_matches_engine_for_both_models(cluster):
    cfg, paths = cluster
    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["llama", "qwen"]
    for model in ("llama", "qwen"):
        eng = make_engine(paths[model], block_size=4)
        prompt = "the quick brown fox"
        want = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0))[0]
        out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        assert out.choices[0].text == want.text
        assert out.usage.completion_tokens == len(want.token_ids)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True) if c.choices)
        assert streamed == want.text
        msgs = [{"role": "user", "content": "hello there"}]
        ids = eng.tokenizer.encode_chat(msgs)
        want_chat = eng.generate([ids], SamplingParams(max_tokens=8, temperature=0.0))[0]
        chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=8,
                                              temperature=0)
        assert chat.choices[0].message.content == want_chat.text


def test_echo_scores_prompts_in_both_layouts(cluster):
    """Prompt logprobs come from the prefill pool across the hand-off
    (llama) and from a colocated replica (qwen)."""
    cfg, paths = cluster
    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    prompt = "the quick brown fox jumps over the lazy dog"
    for model in ("llama", "qwen"):
        eng = make_engine(paths[model], block_size=4)
        want = eng.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, logprobs=1,
                                                     prompt_logprobs=1))[0]
        n = len(want.prompt_token_ids)
        for max_tokens in (0, 2):
            out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                            temperature=0, echo=True, logprobs=1)
            choice = out.choices[0]
            assert choice.text == prompt + (want.text if max_tokens else "")
            lp = choice.logprobs
            assert len(lp.tokens) == n + max_tokens and lp.token_logprobs[0] is None
            assert lp.token_logprobs[1:n] == pytest.approx(
                [x.logprob for x in want.prompt_logprobs[1:]], abs=1e-4)
            assert out.usage.completion_tokens == max_tokens


def test_wrong_key_and_unknown_model(cluster):
    cfg, _ = cluster
    import openai

    bad = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key="wrong",
                 max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                  max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        good.completions.create(model="llama", prompt="x", max_tokens=100000)
    assert e.value.body["param"] == "max_tokens"


def test_grpc_client_streams_same_tokens(cluster):
    cfg, paths = cluster
    eng = make_engine(paths["llama"], block_size=4)
    ids = eng.tokenize("splitserve serves")
    want = eng.generate([ids], SamplingParams(max_tokens=12, temperature=0.0))[0]
    md = [("authorization", f"Bearer {KEY}")]
    with grpc.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}") as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(model="llama", token_ids=pb.TokenIds(ids=ids),
                                 params=pb.SamplingParams(max_tokens=12, temperature=0.0))
        resps = list(stub.Generate(req, metadata=md, timeout=60))
        assert [t for r in resps for t in r.token_ids] == want.token_ids
        assert resps[-1].finish_reason == "length"
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req, timeout=30))  # no key
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_requests_go_only_to_their_models_replicas(cluster):
    cfg, _ = cluster
    reps = ray.get(app.get_router().replicas.remote())
    llama = {r["replica_id"] for r in reps["llama"]["decode"] + reps["llama"]["prefill"]}
    qwen = {r["replica_id"] for r in reps["qwen"]["decode"]}
    assert llama and qwen and not llama & qwen
    assert reps["qwen"]["prefill"] == []  # colocated model: prefill on decode
    # each model is placed by its own router (llama by the first, qwen by the second)
    counters = [ray.get(app.get_router(index=i).counters.remote())
                for i in range(cfg.router.routers)]
    assert all(c["decisions"] > 0 for c in counters)
    assert counters[1]["by_reason"].get("no_prefill_replica", 0) > 0  # the qwen requests


def replica_stats(cfg, model) -> dict:
    """Every replica of ``model`` the router lists: replica id -> its
    ``Stats`` (asked over the worker RPC), typed."""
    import asyncio

    from splitserve.engine.stats import stats_from_wire
    from splitserve.handoff.rpc import WorkerClient

    reps = ray.get(app.get_router().replicas.remote())[model]

    async def ask():
        out = {}
        for r in reps["prefill"] + reps["decode"]:
            c = WorkerClient(r["replica_id"], cfg.cluster_token())
            try:
                out[r["replica_id"]] = stats_from_wire(await c.call("Stats", {}, timeout=10))
            finally:
                await c.close()
        return out

    return asyncio.run(ask())


def pools_free(cfg, model) -> dict:
    """Every replica of ``model`` idle: all blocks free, no request state left."""
    return {rid: s.idle() for rid, s in replica_stats(cfg, model).items()}


def wait_for(pred, timeout=20.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def test_cancelled_grpc_stream_frees_blocks_on_both_pools(cluster):
    cfg, _ = cluster
    md = [("authorization", f"Bearer {KEY}")]
    with grpc.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}") as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(model="llama", text="a long story",
                                 params=pb.SamplingParams(max_tokens=200, temperature=0.0,
                                                          ignore_eos=True))
        call = stub.Generate(req, metadata=md, timeout=60)
        got = [next(call) for _ in range(3)]
        assert all(r.token_ids for r in got)
        call.cancel()
    assert wait_for(lambda: all(pools_free(cfg, "llama").values()))


def test_router_killed_restarts_and_streams_survive(cluster):
    cfg, _ = cluster
    import time

    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    def index_matches():
        try:
            held = ray.get(app.get_router().cached_blocks.remote())
        except ray.exceptions.RayActorError:  # still restarting
            return False
        own = {rid: s.engine.cached_blocks for rid, s in replica_stats(cfg, "llama").items()}
        return sum(own.values()) > 0 and all(held.get(rid) == n for rid, n in own.items())

    # a long prompt cached on both pools before the kill
    client.completions.create(model="llama", prompt="the quick brown fox " * 8, max_tokens=4,
                              temperature=0)
    assert wait_for(index_matches)
    stream = client.completions.create(model="llama", prompt="once upon a time", max_tokens=60,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    ray.kill(app.get_router(), no_restart=False)
    # the in-flight stream never touches the router: it finishes
    rest = [c for c in stream]
    n = len(first.choices[0].text and [1] or []) + sum(1 for c in rest if c.choices)
    assert n >= 1 and rest[-1].choices[0].finish_reason == "length"
    # new requests: served by the other router at once (503 with Retry-After
    # only if no router were up)
    import openai

    statuses, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            out = client.completions.create(model="llama", prompt="hi", max_tokens=3, temperature=0)
            assert out.choices[0].finish_reason in ("length", "stop")
            break
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.response.headers.get("retry-after"), e
            statuses.append(e.status_code)
            time.sleep(0.3)
    else:
        raise AssertionError(f"router did not come back; saw {statuses}")
    # the restarted router relearns every replica's whole prefix cache (a
    # snapshot on each replica's next push), not just what is cached from now on
    assert wait_for(index_matches), (ray.get(app.get_router().cached_blocks.remote()),
                                     replica_stats(cfg, "llama"))
