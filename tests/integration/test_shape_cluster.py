"""Model shapes other than the common tiny one, served by the whole cluster
on a real local Ray node with every prompt prefilled on the prefill pool
and its KV handed to the decode pool:

- one KV head of head_dim 80 (not a power of two), a 1000-token vocabulary
  past the tokenizer's 512 ids, weights stored in bf16;
- Qwen3 with per-head q/k norms over head_dim 48 and YaRN-scaled RoPE;
- a Gemma 2 checkpoint (soft caps, sandwich norms, a window on every other
  layer), a family other than Llama's;
- a hybrid model (Qwen3-Next: Gated DeltaNet layers whose recurrent
  states go in the hand-off as a chunk after the attention layers' blocks).

Greedy tokens through the official ``openai`` client (text, usage,
logprobs) and the gRPC API (token ids) equal transformers' ``generate``.
One cluster serves all four (a cluster's start is most of the time)."""

from __future__ import annotations

import random

import grpc
import pytest
from openai import BadRequestError, OpenAI

from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.stats import DecodeStats, PrefillStats
from tests.fixtures.checkpoints import hf_greedy, hf_model, hf_tokenizer
from tests.fixtures.ports import free_port
from tests.fixtures.shape_variants import shape_config
from tests.integration.pd_harness import make_engine
from tests.integration.ray_cluster import local_ray
from tests.integration.test_cluster_e2e import replica_stats, wait_for, pools_free

pytestmark = pytest.mark.slow

KEY = "sk-shape-test"
MODELS = {"mqa80": "bf16_mqa_hd80_vocab_1000", "qwen3yarn": "qwen3_yarn_hd48"}
MAX_NEW = 8
GEMMA_NEW = 12
NUM_BLOCKS, BLOCK = 48, 4  # 192 tokens of KV per replica: less than the models' 256 positions


@pytest.fixture(scope="module")
def cluster(shape_checkpoints, tiny_checkpoints):
    paths = {name: shape_checkpoints[shape] for name, shape in MODELS.items()}
    paths["gemma2"] = tiny_checkpoints["gemma2"]
    paths["qwen3_next"] = tiny_checkpoints["qwen3_next"]
    http, grpc_port = free_port(), free_port()
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    cfg = parse_config({
        "models": [{"model": {"name": name, "path": str(path), "num_blocks": NUM_BLOCKS,
                              "block_size": BLOCK},
                    "prefill": pool, "decode": pool} for name, path in paths.items()],
        "router": {"local_prefill_max_tokens": 0},  # every prompt goes through the hand-off
        "auth": {"api_keys": [KEY], "cluster_token": "shape-token"},
        "endpoints": {"http_port": http, "grpc_port": grpc_port},
    })
    with local_ray(num_cpus=4):
        app.deploy(cfg, wait_s=180)
        yield cfg, paths


def prompts_for(name: str) -> list[list[int]]:
    """Token-id prompts over the model's whole vocabulary (ids past the
    tokenizer's too), across several 4-token blocks."""
    vocab = shape_config(MODELS[name])["vocab_size"]
    rng = random.Random(3)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (3, 11, 26)]


@pytest.mark.parametrize("name", list(MODELS))
def test_openai_and_grpc_tokens_equal_transformers_across_the_handoff(cluster, name):
    cfg, paths = cluster
    path = paths[name]
    prompts = prompts_for(name)
    want = hf_greedy(hf_model(path), prompts, MAX_NEW)
    tok = hf_tokenizer(path)
    before = replica_stats(cfg, name)
    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    for p, w in zip(prompts, want):
        out = client.completions.create(model=name, prompt=p, max_tokens=MAX_NEW, temperature=0,
                                        logprobs=1, extra_body={"ignore_eos": True})
        choice = out.choices[0]
        assert choice.text == tok.decode(w, skip_special_tokens=True)
        assert out.usage.completion_tokens == MAX_NEW and out.usage.prompt_tokens == len(p)
        assert len(choice.logprobs.tokens) == MAX_NEW
    md = [("authorization", f"Bearer {KEY}")]
    with grpc.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}") as ch:
        stub = pb_grpc.GenerationStub(ch)
        for p, w in zip(prompts, want):
            req = pb.GenerateRequest(model=name, token_ids=pb.TokenIds(ids=p),
                                     params=pb.SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                                                              ignore_eos=True))
            resps = list(stub.Generate(req, metadata=md, timeout=60))
            assert [t for r in resps for t in r.token_ids] == w
    # every request was prefilled on the prefill pool and its KV handed off
    after = replica_stats(cfg, name)
    sent = sum(s.completed - before[r].completed for r, s in after.items() if isinstance(s, PrefillStats))
    got = sum(s.handoffs - before[r].handoffs for r, s in after.items() if isinstance(s, DecodeStats))
    assert sent == got == 2 * len(prompts)
    assert wait_for(lambda: all(pools_free(cfg, name).values()))


def test_a_request_larger_than_any_replicas_kv_is_a_400_naming_max_tokens(cluster):
    """Within the model's context (256) but past what a decode replica's
    whole KV cache holds (192): no wait makes it fit, so the client hears
    at once that max_tokens is the problem, on both APIs, and nothing leaks."""
    cfg, _ = cluster
    name = "mqa80"
    prompt = prompts_for(name)[1]  # 11 tokens
    too_many = NUM_BLOCKS * BLOCK - len(prompt) + 10
    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model=name, prompt=prompt, max_tokens=too_many, temperature=0)
    assert e.value.body["param"] == "max_tokens" and "can never fit" in e.value.body["message"]
    md = [("authorization", f"Bearer {KEY}")]
    with grpc.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}") as ch:
        req = pb.GenerateRequest(model=name, token_ids=pb.TokenIds(ids=prompt),
                                 params=pb.SamplingParams(max_tokens=too_many))
        with pytest.raises(grpc.RpcError) as g:
            list(pb_grpc.GenerationStub(ch).Generate(req, metadata=md, timeout=60))
        assert g.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(g.value.trailing_metadata())["splitserve-param"] == "max_tokens"
    # one that fits is served
    out = client.completions.create(model=name, prompt=prompt, max_tokens=too_many - 20,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == too_many - 20
    assert wait_for(lambda: all(pools_free(cfg, name).values()))


def test_gemma2_through_the_handoff_matches_transformers(cluster):
    cfg, paths = cluster
    path = paths["gemma2"]
    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    prompt = "the quick brown fox jumps over the lazy dog and runs into the woods"
    eng = make_engine(path, block_size=BLOCK)
    local = eng.generate([prompt], SamplingParams(max_tokens=GEMMA_NEW, temperature=0.0,
                                                  ignore_eos=True))[0]
    assert len(local.prompt_token_ids) > 8  # longer than the window of the sliding layers
    assert local.token_ids == hf_greedy(hf_model(path), [local.prompt_token_ids], GEMMA_NEW)[0]
    out = client.completions.create(model="gemma2", prompt=prompt, max_tokens=GEMMA_NEW,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == local.text
    assert out.usage.completion_tokens == GEMMA_NEW
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gemma2", prompt=prompt, max_tokens=GEMMA_NEW, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == local.text


def test_hybrid_model_through_the_handoff_matches_transformers(cluster):
    cfg, paths = cluster
    name = "qwen3_next"
    path = paths[name]
    tok = hf_tokenizer(path)
    prompts = [[(13 * i + j * 7) % 500 + 3 for j in range(n)] for i, n in enumerate((5, 19, 30))]
    want = hf_greedy(hf_model(path), prompts, MAX_NEW)
    before = replica_stats(cfg, name)
    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    for p, w in zip(prompts, want):
        out = client.completions.create(model=name, prompt=p, max_tokens=MAX_NEW, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == tok.decode(w, skip_special_tokens=True)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=name, prompt=p, max_tokens=MAX_NEW, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices)
        assert streamed == out.choices[0].text
    after = replica_stats(cfg, name)
    sent = sum(s.completed - before[r].completed for r, s in after.items() if isinstance(s, PrefillStats))
    got = sum(s.handoffs - before[r].handoffs for r, s in after.items() if isinstance(s, DecodeStats))
    assert sent == got == 2 * len(prompts)
    assert wait_for(lambda: all(pools_free(cfg, name).values()))
