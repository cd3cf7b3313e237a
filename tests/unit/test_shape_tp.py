"""Tensor parallelism (TP=2 on CPU over gloo) for shapes of
tests.fixtures.shape_variants that split unevenly or not at all: one KV head
replicated on both ranks (MQA, head_dim 80, bf16, 1000-token vocabulary),
an odd vocabulary whose last shard is padded (515), three query heads per
rank, and top-4-of-8 experts of width 24 split in two."""

from __future__ import annotations

import pytest

from splitserve.engine.llm_engine import LLMEngine
from tests.unit.test_tp_engine import check_parity


@pytest.fixture
def engines():
    made: list[LLMEngine] = []
    yield made
    for e in made:
        e.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bf16_mqa_hd80_vocab_1000", "vocab_515", "gqa3", "qwen3_moe_top4"])
def test_tp2_shape_parity_with_transformers(shape_checkpoints, engines, name):
    eng = check_parity(shape_checkpoints[name], 2, engines, max_num_batched_tokens=8)
    assert eng.runner.tp is not None
