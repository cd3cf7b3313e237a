"""Token parity with transformers for model shapes the family tests do not
cover (tests.fixtures.shape_variants): prefill logits against transformers
in float32, and greedy generation through the engine with a paged cache,
chunked prefill, prefix-cache hits and a KV hand-off into a second engine."""

import random

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.fixtures.handoff import handoff_generate
from tests.fixtures.shape_variants import SHAPE_VARIANTS, shape_config

MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
SHAPES = list(SHAPE_VARIANTS)


def prompts_for(name: str) -> list[list[int]]:
    """Prompts over the model's whole vocabulary (past the tokenizer's ids
    where the model has more), short and long enough to span several blocks
    and chunks; the longest still fits the shortest context."""
    vocab = shape_config(name)["vocab_size"]
    rng = random.Random(7)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (1, 5, 13, 22)]


def engine(path, **kw) -> LLMEngine:
    args = dict(model=str(path), num_blocks=64, block_size=4, max_num_batched_tokens=7,
                max_num_seqs=4, enable_prefix_caching=True)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


@pytest.fixture(scope="module", params=SHAPES)
def shape(request, shape_checkpoints):
    path = shape_checkpoints[request.param]
    model = hf_model(path)
    prompts = prompts_for(request.param)
    return request.param, path, model, prompts, hf_greedy(model, prompts, MAX_NEW)


def test_prefill_logits_match_transformers(shape):
    _, path, model, prompts, _ = shape
    eng = engine(path, max_num_batched_tokens=64)  # one step per prompt: every row's logits
    for p in prompts:
        eng.add_request("x", prompt_token_ids=p, params=SamplingParams(max_tokens=1, temperature=0.0))
        sched = eng.scheduler.schedule()
        logits, _, _ = eng.runner.execute(sched.scheduled, eng.kv)
        eng.scheduler.commit(sched)
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0, -1].float()
        assert logits.shape[-1] == model.config.vocab_size
        torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)
        eng.abort("x")
    assert eng.kv.all_free()


def test_greedy_generate_matches_transformers(shape):
    """Chunked prefill (7-token steps) over 4-token blocks, batched; then the
    same prompts again, now hitting the prefix cache."""
    _, path, _, prompts, want = shape
    eng = engine(path)
    got = [r.token_ids for r in eng.generate(prompts, GREEDY)]
    assert got == want
    hits = eng.kv.pool.hits
    again = [r.token_ids for r in eng.generate(prompts, GREEDY)]
    assert again == want
    assert eng.kv.pool.hits > hits
    eng.kv.check_invariants()
    assert eng.kv.all_free()


def test_kv_handoff_keeps_parity(shape):
    """Prefill on one engine, KV exported and imported into another, decode there."""
    _, path, _, prompts, want = shape
    src, dst = engine(path), engine(path, max_num_batched_tokens=64)
    assert handoff_generate(src, dst, prompts, GREEDY) == want
    assert src.kv.all_free() and dst.kv.all_free()
