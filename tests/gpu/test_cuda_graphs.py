"""Decode steps replayed from CUDA graphs give the eager engine's tokens."""

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graph_decode_matches_eager(tiny_llama):
    kw = dict(model=str(tiny_llama), device="cuda", dtype="float32", num_blocks=256,
              block_size=16, max_num_seqs=8)
    graphed = LLMEngine(EngineConfig(**kw))
    eager = LLMEngine(EngineConfig(**kw, enforce_eager=True))
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 17, 30, 2)]  # batch 5 -> bucket 8
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    a = [r.token_ids for r in graphed.generate(prompts, sp)]
    b = [r.token_ids for r in eager.generate(prompts, sp)]
    assert a == b
    assert graphed.runner.graphs.replays > 0
    assert graphed.kv.all_free()
