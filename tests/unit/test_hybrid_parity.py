"""Hybrid models (a recurrent state per sequence beside the paged KV cache:
Qwen3-Next's Gated DeltaNet layers) through ``LLMEngine`` against
transformers on tiny random checkpoints, in float32: greedy tokens with
chunked prefill, decoding batched beside prompt chunks, preemption by
recompute, prompt logprobs through the prompt-scoring path; states freed
with their sequences; prefix caching off; the options hybrids refuse."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.spec.config import SpeculativeConfig
from tests.fixtures.checkpoints import hf_greedy, hf_model

HYBRID_VARIANTS = ("qwen3_next", "granitemoehybrid", "granitemoehybrid_dense", "bamba",
                   "nemotron_h")
# a prompt past one delta-rule chunk (64 tokens), and short ones
PROMPTS = [[5, 9, 13], [7] * 9, list(range(20, 37)), [(i * 37) % 400 + 3 for i in range(83)]]


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), **{"num_blocks": 96, "block_size": 4, **kw}))


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    cache = {}

    def get(variant):
        if variant not in cache:
            ref = hf_model(tiny_checkpoints[variant])
            cache[variant] = (ref, hf_greedy(ref, PROMPTS, 6))
        return cache[variant]
    return get


@pytest.mark.parametrize("variant", HYBRID_VARIANTS)
@pytest.mark.parametrize("budget", [8, 512])
def test_engine_greedy_matches_transformers(tiny_checkpoints, references, variant, budget):
    # budget 8: prompts in chunks of 8 mixed with decoding sequences; 512: whole prompts
    _, want = references(variant)
    eng = engine(tiny_checkpoints[variant], max_num_batched_tokens=budget)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(PROMPTS, params)] == want
    # one at a time, on slots other sequences used before: the states start over
    assert [eng.generate([p], params)[0].token_ids for p in PROMPTS[:2]] == want[:2]
    assert eng.kv.all_free()


@pytest.mark.parametrize("variant", HYBRID_VARIANTS)
def test_preemption_recomputes_the_state(tiny_checkpoints, references, variant):
    # four 15-token prompts fit 24 blocks of 4 tokens, their 27-token ends do not: the
    # latest admitted are preempted as the others grow, and recomputed from their first token
    ref, _ = references(variant)
    prompts = [[(i * 7 + j * 11) % 300 + 3 for j in range(15)] for i in range(4)]
    want = hf_greedy(ref, prompts, 12)
    eng = engine(tiny_checkpoints[variant], num_blocks=24, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
    assert eng.scheduler.num_preemptions > 0
    assert eng.kv.all_free()


@pytest.mark.parametrize("variant", HYBRID_VARIANTS)
def test_prompt_logprobs_match_transformers(tiny_checkpoints, references, variant):
    ref, _ = references(variant)
    prompt = PROMPTS[3]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    want = logits[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    eng = engine(tiny_checkpoints[variant], max_num_batched_tokens=16)
    out = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_no_prefix_cache_hits_and_slots_freed(tiny_checkpoints, references):
    _, want = references("qwen3_next")
    eng = engine(tiny_checkpoints["qwen3_next"], max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for _ in range(2):  # the same prompt again: computed again, never read from a cache
        out = eng.generate([PROMPTS[3]], params)[0]
        assert out.token_ids == want[3]
        assert out.num_cached_tokens == 0
    assert eng.kv.states.all_free() and eng.kv.all_free()


def test_refusals(tiny_checkpoints):
    path = tiny_checkpoints["qwen3_next"]
    with pytest.raises(CheckpointError, match="speculative decoding is not supported"):
        engine(path, speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=2))
    with pytest.raises(Exception, match="LoRA adapters are not supported"):
        engine(path, max_loras=1)
