"""Tensor parallelism over NCCL: a TP=2 engine on two GPUs generates the
tokens of a TP=1 engine, and hands KV off to it. Skipped below two GPUs
(one GPU runs TP=1 only)."""

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.handoff import handoff_generate

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def test_tp2_nccl_matches_tp1_and_hands_off(tiny_llama):
    kw = dict(model=str(tiny_llama), device="cuda", dtype="float32", num_blocks=256,
              block_size=16, max_num_seqs=8)
    one = LLMEngine(EngineConfig(**kw))
    two = LLMEngine(EngineConfig(**kw, tensor_parallel_size=2))
    try:
        prompts = [list(range(5, 5 + n)) for n in (3, 9, 17, 30, 2)]
        sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        want = [r.token_ids for r in one.generate(prompts, sp)]
        assert [r.token_ids for r in two.generate(prompts, sp)] == want
        assert handoff_generate(two, one, prompts, sp) == want
        assert handoff_generate(one, two, prompts, sp) == want
    finally:
        two.close()
