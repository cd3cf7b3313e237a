"""Prompt logprobs (``SamplingParams.prompt_logprobs``) against transformers:
each prompt token's log-probability given the tokens before it, and the top
alternatives, whether the prompt runs in one chunk or several, when its
prefix is cached, under preemption, and across a KV hand-off."""

import random

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import InvalidRequestError
from tests.fixtures.handoff import export_layers, export_meta, import_kv
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_model

TOP = 3
PARAMS = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP)


def make(path, **kw):
    args = dict(model=str(path), num_blocks=256, block_size=4, max_num_batched_tokens=512)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def case(request, tiny_checkpoints):
    path = tiny_checkpoints[request.param]
    model = hf_model(path)
    rng = random.Random(1)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (1, 2, 9, 23, 40)]
    refs = []
    with torch.no_grad():
        for p in prompts:
            lp = model(torch.tensor([p])).logits[0].float().log_softmax(-1)  # [P, V]
            refs.append([None] + [(p[i + 1], lp[i, p[i + 1]].item(), lp[i].topk(TOP))
                                  for i in range(len(p) - 1)])
    return path, prompts, refs


def check(got, ref):
    assert got is not None and len(got) == len(ref)
    assert got[0] is None
    for g, (tok, want, top) in zip(got[1:], ref[1:]):
        assert g.token_id == tok
        assert g.logprob == pytest.approx(want, abs=1e-4)
        assert [t for t, _ in g.top] == top.indices.tolist()
        assert [v for _, v in g.top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("chunk", [512, 8])
def test_match_transformers_in_one_chunk_or_several(case, chunk):
    path, prompts, refs = case
    eng = make(path, max_num_batched_tokens=chunk)
    results = eng.generate(prompts, PARAMS)
    for r, ref in zip(results, refs):
        check(r.prompt_logprobs, ref)
        assert len(r.token_ids) == 2
    assert eng.kv.all_free()


def test_cached_prefix_is_scored_again(case):
    path, prompts, refs = case
    eng = make(path, enable_prefix_caching=True)
    plain = SamplingParams(max_tokens=1, temperature=0.0)
    eng.generate([prompts[-1]], plain)  # caches the prompt's blocks
    r = eng.generate([prompts[-1]], PARAMS)[0]
    check(r.prompt_logprobs, refs[-1])
    assert r.num_cached_tokens == 0
    # without prompt logprobs the same prompt hits the cache
    assert eng.generate([prompts[-1]], plain)[0].num_cached_tokens > 0
    assert eng.kv.all_free()


def test_preemption_scores_each_token_once(case):
    path, prompts, refs = case
    eng = make(path, num_blocks=14, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP)
    results = eng.generate(prompts[2:], params)
    assert eng.scheduler.num_preemptions > 0
    for r, ref in zip(results, refs[2:]):
        check(r.prompt_logprobs, ref)
    assert eng.kv.all_free()


def test_carried_across_the_handoff(case):
    path, prompts, refs = case
    src, dst = make(path), make(path)
    for i, p in enumerate(prompts):
        src.add_request(f"r{i}", prompt_token_ids=p, params=PARAMS, prefill_only=True)
    while src.has_unfinished():
        src.step()
    for i, ref in enumerate(refs):
        meta = export_meta(src, f"r{i}")
        _, first = import_kv(dst, meta, export_layers(src, f"r{i}", 0, src.model_cfg.num_layers))
        src.kv_port.release(f"r{i}")
        check(first.prompt_logprobs, ref)
        assert first.to_dict()["prompt_logprobs"][0] is None
    while dst.has_unfinished():
        for out in dst.step():
            assert out.prompt_logprobs is None  # delivered once, with the first token
    assert src.kv.all_free() and dst.kv.all_free()


def test_not_asked_for_means_none(case):
    path, prompts, _ = case
    r = make(path).generate([prompts[2]], SamplingParams(max_tokens=1, temperature=0.0))[0]
    assert r.prompt_logprobs is None


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True])
def test_out_of_range_is_refused(bad):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(prompt_logprobs=bad).validate()
    assert e.value.param == "prompt_logprobs"
