"""A Gemma 2 checkpoint (soft caps, sandwich norms, a window on every other
layer) served by a real local cluster: the prompt is prefilled on the
prefill pool, its KV cache handed to the decode pool, and the OpenAI API's
greedy completion is transformers' greedy continuation."""

import pytest
from openai import OpenAI

from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.fixtures.ports import free_port
from tests.integration.pd_harness import make_engine
from tests.integration.ray_cluster import local_ray

KEY = "sk-families-test"
MAX_NEW = 12


@pytest.fixture(scope="module")
def gemma2_cluster(tiny_checkpoints):
    path = tiny_checkpoints["gemma2"]
    http = free_port()
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    cfg = parse_config({
        "models": [{"model": {"name": "gemma2", "path": str(path), "num_blocks": 128, "block_size": 4},
                    "prefill": pool, "decode": pool}],
        "router": {"local_prefill_max_tokens": 0},  # every prompt through the hand-off
        "auth": {"api_keys": [KEY], "cluster_token": "families-token"},
        "endpoints": {"http_port": http, "grpc_port": free_port()},
    })
    with local_ray(num_cpus=4):
        app.deploy(cfg, wait_s=180)
        yield cfg, path
        app.shutdown()


@pytest.mark.slow
def test_gemma2_through_the_handoff_matches_transformers(gemma2_cluster):
    cfg, path = gemma2_cluster
    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    prompt = "the quick brown fox jumps over the lazy dog and runs into the woods"
    eng = make_engine(path, block_size=4)
    local = eng.generate([prompt], SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                                                  ignore_eos=True))[0]
    assert len(local.prompt_token_ids) > 8  # longer than the window of the sliding layers
    assert local.token_ids == hf_greedy(hf_model(path), [local.prompt_token_ids], MAX_NEW)[0]
    out = client.completions.create(model="gemma2", prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == local.text
    assert out.usage.completion_tokens == MAX_NEW
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gemma2", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == local.text
