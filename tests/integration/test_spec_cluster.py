"""Speculative decoding on a live local disaggregated cluster (one prefill,
one decode replica, n-gram proposer): completions through the official
openai client equal the non-speculative engine's greedy outputs, the
decode replica reports verified drafts on /metrics (vLLM's names too),
and a request can opt out, over HTTP and over gRPC."""

import time
import urllib.request

import grpc
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.pd_harness import make_engine
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}
    cfg = parse_config({
        "models": [{"model": {"name": "tiny", "path": str(tiny_llama), "num_blocks": 128,
                              "block_size": 4,
                              "speculative": {"method": "ngram", "num_speculative_tokens": 3,
                                              "ngram_max": 3, "adaptive": False}},
                    "prefill": pool, "decode": pool}],
        "router": {"local_prefill_max_tokens": 0, "stats_period_s": 0.2},
        "auth": {"cluster_token": "spec-test-token"},
        "endpoints": {"http_port": free_port(), "grpc_port": free_port()},
        "observability": {"vllm_metric_names": True},
    })
    with local_ray(num_cpus=4):
        app.deploy(cfg, wait_s=180)
        yield cfg


def metric(cfg, name: str) -> float:
    url = f"http://127.0.0.1:{cfg.endpoints.http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name)


def test_ngram_outputs_equal_plain_greedy_outputs(cluster, tiny_llama):
    client = OpenAI(base_url=f"http://127.0.0.1:{cluster.endpoints.http_port}/v1",
                    api_key="unused", max_retries=0)
    eng = make_engine(tiny_llama, block_size=4)
    # prompts that repeat themselves: prompt lookup has something to find
    prompts = ["the cat sat on the mat. the cat sat on the",
               "def add(a, b): return a + b\ndef add(a, b):",
               "one two three four one two three four one two"]
    want = [r.text for r in eng.generate(prompts, SamplingParams(max_tokens=20,
                                                                 temperature=0.0))]
    for prompt, text in zip(prompts, want):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=20,
                                        temperature=0)
        assert out.choices[0].text == text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True)
            if c.choices)
        assert streamed == text
        opted_out = client.completions.create(model="tiny", prompt=prompt, max_tokens=20,
                                              temperature=0, extra_body={"speculative": False})
        assert opted_out.choices[0].text == text
    deadline = time.monotonic() + 30
    while metric(cluster, "splitserve_spec_decode_draft_tokens_total") == 0:
        assert time.monotonic() < deadline, "no verified drafts reported"
        time.sleep(0.5)
    assert metric(cluster, "vllm:spec_decode_num_draft_tokens_total") > 0
    assert metric(cluster, "splitserve_spec_decode_accepted_tokens_total") > 0


def grpc_text(cfg, prompt: str, **params) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}") as ch:
        req = pb.GenerateRequest(model="tiny", text=prompt, params=pb.SamplingParams(
            max_tokens=20, temperature=0.0, ignore_eos=True, **params))
        return "".join(r.text for r in pb_grpc.GenerationStub(ch).Generate(req, timeout=60))


def settled(cfg, name: str) -> float:
    """The metric once two scrapes a second apart agree (replica stats are
    pushed every router.stats_period_s)."""
    prev = metric(cfg, name)
    while True:
        time.sleep(1.0)
        now = metric(cfg, name)
        if now == prev:
            return now
        prev = now


def test_grpc_request_opts_out_of_speculation(cluster, tiny_llama):
    # the tiny model's output repeats its tokens here: prompt lookup drafts
    prompt = "the cat sat on the mat. the cat sat on the"
    want = make_engine(tiny_llama, block_size=4).generate(
        [prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0].text
    name = "splitserve_spec_decode_draft_tokens_total"
    before = settled(cluster, name)
    assert grpc_text(cluster, prompt, speculative=False) == want
    assert settled(cluster, name) == before  # not one draft verified for it
    assert grpc_text(cluster, prompt) == want  # unset: speculates
    deadline = time.monotonic() + 30
    while metric(cluster, name) == before:
        assert time.monotonic() < deadline, "the default request verified no drafts"
        time.sleep(0.5)
