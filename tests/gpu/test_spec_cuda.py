"""Speculative decoding on CUDA: verify steps run eagerly beside graph-replayed
plain decode steps (target and draft), and the output is the plain engine's."""

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.spec.config import SpeculativeConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_spec_on_cuda_matches_plain(tiny_llama, kv_cache_dtype):
    kw = dict(model=str(tiny_llama), device="cuda", dtype="float32", num_blocks=256,
              block_size=16, max_num_seqs=8, kv_cache_dtype=kv_cache_dtype)
    plain = LLMEngine(EngineConfig(**kw))
    prompts = [list(range(5, 5 + n)) * 2 for n in (3, 9, 17, 2)]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [r.token_ids for r in plain.generate(prompts, sp)]
    for spec in (SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False),
                 SpeculativeConfig(method="draft", draft_model=str(tiny_llama),
                                   num_speculative_tokens=4, adaptive=False)):
        eng = LLMEngine(EngineConfig(**kw, speculative=spec))
        assert [r.token_ids for r in eng.generate(prompts, sp)] == want
        assert eng.spec.counters.draft_tokens > 0
        assert eng.kv.all_free() and eng.spec.all_free()
    assert eng.spec.counters.accepted_tokens == eng.spec.counters.draft_tokens  # self-draft
    assert eng.spec.proposer.runner.graphs.replays > 0  # the draft's decode steps replayed
