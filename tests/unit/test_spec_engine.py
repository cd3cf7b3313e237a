"""Speculative decoding through the whole engine: outputs equal the
non-speculative engine's (greedy, and seeded sampling) for the n-gram and
draft-model proposers, with every engine feature that touches a token run;
block pools return to their initial state."""

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.hashing import block_hashes
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import Sequence
from splitserve.engine.spec.config import SpeculativeConfig

GREEDY = dict(temperature=0.0, ignore_eos=True)
# the engines here verify the full length every step: the adaptive rule
# (test_spec_parts.py) would turn a draft as slow as the target off
FIXED = dict(adaptive=False)


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
                                              ngram_min=1, ngram_max=3, **FIXED))


@pytest.fixture(scope="module")
def self_draft(tiny_llama):
    return make(tiny_llama, SpeculativeConfig(method="draft", draft_model=str(tiny_llama),
                                              num_speculative_tokens=3, **FIXED))


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


def test_step_curve_resolved_by_device(ngram, tiny_llama):
    from splitserve.engine.spec.adaptive import StepCurve, default_step_curve

    assert ngram.spec.curve == default_step_curve("cpu")  # a CPU engine, no setting
    eng = make(tiny_llama, SpeculativeConfig(method="ngram", saturation_tokens=300))
    assert eng.spec.curve == StepCurve(saturation_tokens=300)


def lengths(eng, prompt, params) -> list[int]:
    """The speculation length of each step of one request."""
    eng.add_request(None, prompt_token_ids=prompt, params=params)
    ks = []
    while eng.has_unfinished():
        eng.step()
        ks.append(eng.spec.last_k)
    assert idle(eng)
    return ks


def test_probes_only_where_acceptance_could_make_speculation_pay(tiny_llama):
    prompt = copy_prompts(64, n=1, seed=12)[0]
    sp = SamplingParams(max_tokens=45, **GREEDY)  # past one PROBE_INTERVAL of decode steps
    # acceptance measured as nil: off, then probed to measure it again
    probing = make(tiny_llama, SpeculativeConfig(method="ngram"))
    probing.spec.tracker.alpha = 0.0
    ks = lengths(probing, prompt, sp)
    assert ks[:30] == [0] * 30 and 4 in ks
    # a knee of 1 token: verifying k drafts costs k + 1 steps, which no
    # acceptance pays back, so a probe could only cost
    costly = make(tiny_llama, SpeculativeConfig(method="ngram", saturation_tokens=1))
    costly.spec.tracker.alpha = 0.0
    assert set(lengths(costly, prompt, sp)) == {0}


def test_draft_prefill_is_one_off_work_not_per_token_cost(self_draft):
    """The draft's catch-up forward counts as one-off work (left out of the
    adaptive rule's per-token draft cost) exactly when it prefills."""
    prop = self_draft.spec.proposer
    prompt = copy_prompts(self_draft.model_cfg.vocab_size, n=1, seed=11)[0] * 3
    seq = Sequence("one-off", prompt, SamplingParams(), prop.block_size)
    try:
        d = prop.propose([seq], [3])[0]
        assert len(d) == 3 and prop.one_off_s > 0  # the whole prompt prefilled
        for tok in d[:2] + [7]:  # two drafts accepted, then the target's own token
            seq.append_token(tok)
        prop.propose([seq], [3])
        assert prop.one_off_s == 0.0  # steady state: one catch-up token
        for tok in [5, 6, 7, 8, 9]:  # steps without drafts: the mirror falls behind
            seq.append_token(tok)
        prop.propose([seq], [3])
        assert prop.one_off_s > 0
    finally:
        prop.release("one-off")
    assert prop.all_free()


def test_chunked_prefill_and_preemption_keep_outputs(plain, tiny_llama):
    # 4 sequences of up to 41 tokens (11 blocks) in 16 blocks of 4: preemption
    ps = copy_prompts(plain.model_cfg.vocab_size, n=4, seed=3)
    sp = SamplingParams(max_tokens=28, **GREEDY)
    want = [r.token_ids for r in run(plain, ps, sp)]
    for spec in (SpeculativeConfig(num_speculative_tokens=4, adaptive=False),
                 SpeculativeConfig(method="draft", draft_model=str(tiny_llama),
                                   num_speculative_tokens=3, adaptive=False, draft_num_blocks=20)):
        eng = make(tiny_llama, spec, num_blocks=16, max_num_batched_tokens=8)
        assert [r.token_ids for r in run(eng, ps, sp)] == want
        assert eng.scheduler.num_preemptions > 0 and eng.spec.counters.accepted_tokens > 0


def test_stops_limits_logprobs_and_penalties_match(plain, self_draft):
    ps = copy_prompts(plain.model_cfg.vocab_size, n=2, seed=4)
    full = run(plain, ps[:1], SamplingParams(max_tokens=20, **GREEDY))[0]
    text, ids = full.text, full.token_ids
    stop = next(text[i:i + 2] for i in range(6, len(text) - 2)
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    cases = [
        SamplingParams(max_tokens=20, stop=[stop], **GREEDY),  # a stop inside an accepted run
        SamplingParams(max_tokens=20, stop_token_ids=[ids[9]], **GREEDY),
        SamplingParams(max_tokens=1, **GREEDY),
        SamplingParams(max_tokens=2, **GREEDY),
        SamplingParams(max_tokens=7, min_tokens=5, temperature=0.0),
        SamplingParams(max_tokens=12, logprobs=3, **GREEDY),
        SamplingParams(max_tokens=12, repetition_penalty=1.5, frequency_penalty=0.5,
                       presence_penalty=0.3, logit_bias={5: 3.0}, **GREEDY),
    ]
    for sp in cases:
        want = run(plain, ps, sp)
        got = run(self_draft, ps, sp)
        for w, g in zip(want, got):
            assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
            assert len(g.token_ids) <= sp.max_tokens
            if sp.logprobs:
                assert [lp.token_id for lp in g.logprobs] == g.token_ids
                for a, b in zip(g.logprobs, w.logprobs):
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                    assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert self_draft.spec.counters.accepted_tokens > 0


def test_seeded_sampling_is_identical_and_unseeded_sampling_runs(plain, self_draft, ngram,
                                                                 tiny_llama):
    ps = copy_prompts(plain.model_cfg.vocab_size, n=2, seed=5)
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=42, ignore_eos=True)
    want = [r.token_ids for r in run(plain, ps, sp)]
    assert [r.token_ids for r in run(self_draft, ps, sp)] == want
    assert [r.token_ids for r in run(ngram, ps, sp)] == want
    # unseeded: rejection sampling (its distribution: test_spec_rejection.py)
    free = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    eng = make(tiny_llama, SpeculativeConfig(method="draft", draft_model=str(tiny_llama),
                                             adaptive=False, num_speculative_tokens=2))
    got = run(eng, ps, free)
    assert all(len(r.token_ids) == 12 for r in got)
    assert eng.spec.counters.draft_tokens > 0


def test_structured_output_drafts_pass_the_grammar(plain, self_draft, ngram):
    ps = copy_prompts(plain.model_cfg.vocab_size, n=2, seed=6)
    spec = {"type": "regex", "value": "(ab|ba|a b)+c?"}
    sp = SamplingParams(max_tokens=16, structured_output=spec, temperature=0.0)
    want = run(plain, ps, sp)
    for eng in (self_draft, ngram):
        got = run(eng, ps, sp)
        assert [(r.token_ids, r.text) for r in got] == [(r.token_ids, r.text) for r in want]


def test_fp8_kv_cache_keeps_outputs(tiny_llama):
    ps = copy_prompts(512, n=2, seed=7)
    sp = SamplingParams(max_tokens=16, **GREEDY)
    want = run(make(tiny_llama, kv_cache_dtype="fp8"), ps, sp)
    eng = make(tiny_llama, SpeculativeConfig(method="draft", draft_model=str(tiny_llama),
                                             num_speculative_tokens=3, **FIXED),
               kv_cache_dtype="fp8")
    assert [r.token_ids for r in run(eng, ps, sp)] == [r.token_ids for r in want]
    assert eng.spec.counters.accepted_tokens > 0


def test_prefix_cache_holds_only_accepted_tokens(ngram):
    ps = copy_prompts(ngram.model_cfg.vocab_size, n=3, seed=8)
    ngram.kv.pool.reset_prefix_cache()
    res = run(ngram, ps, SamplingParams(max_tokens=20, **GREEDY))
    accepted = set()
    for r in res:
        # the last token never has KV; every full block before it may be cached
        accepted |= set(block_hashes((r.prompt_token_ids + r.token_ids)[:-1], 4))
    cached = set(ngram.kv.pool.hash_to_block)
    assert cached and cached <= accepted


def test_opt_out_and_resume_on_another_engine(plain, self_draft):
    ps = copy_prompts(plain.model_cfg.vocab_size, n=2, seed=9)
    c = self_draft.spec.counters
    d0 = c.draft_tokens
    sp = SamplingParams(max_tokens=10, speculative=False, **GREEDY)
    want = run(plain, ps, sp)
    assert [r.token_ids for r in run(self_draft, ps, sp)] == [r.token_ids for r in want]
    assert c.draft_tokens == d0  # opted out: nothing drafted
    # a request resumed elsewhere: its earlier output ends its prompt; the
    # draft prefills prompt and output itself
    full = run(plain, ps[:1], SamplingParams(max_tokens=18, **GREEDY))[0].token_ids
    resumed = run(self_draft, [ps[0] + full[:8]],
                  SamplingParams(max_tokens=10, resumed_tokens=8, **GREEDY))[0]
    assert resumed.token_ids == full[8:] and c.draft_tokens > d0


def test_handoff_admission_prefills_the_draft(tiny_llama, plain):
    prefill = make(tiny_llama)
    decode = make(tiny_llama, SpeculativeConfig(method="draft", draft_model=str(tiny_llama),
                                                num_speculative_tokens=3, **FIXED))
    prompt = copy_prompts(plain.model_cfg.vocab_size, n=1, seed=10)[0]
    sp = SamplingParams(max_tokens=14, **GREEDY)
    want = run(plain, [prompt], sp)[0].token_ids
    prefill.add_request("r", prompt_token_ids=prompt, params=sp, prefill_only=True)
    while prefill.has_unfinished():
        prefill.step()
    src, dst = prefill.kv_port, decode.kv_port
    seq = src.export_sequence("r")
    res = dst.reserve("r", seq.prompt_token_ids, sp.max_tokens)
    dst.import_layers(res, 0, src.export_layers("r", 0, plain.model_cfg.num_layers,
                                               res.cached_tokens))
    src.release("r")
    toks = list(dst.admit(res, seq).new_token_ids)
    while decode.has_unfinished():
        for o in decode.step():
            toks += o.new_token_ids
    assert toks == want and decode.spec.counters.accepted_tokens > 0
    assert idle(decode) and idle(prefill)


def test_lora_adapters_verify_with_their_adapter(tiny_llama, tmp_path):
    pytest.importorskip("peft")
    from tests.fixtures.lora_adapters import build_adapter

    path = build_adapter(tiny_llama, tmp_path / "attn", seed=1, r=4, lora_alpha=8)
    ps = copy_prompts(512, n=3, seed=11)
    sp = SamplingParams(max_tokens=12, **GREEDY)
    engines = [make(tiny_llama, spec, max_loras=1) for spec in (
        None, SpeculativeConfig(method="draft", draft_model=str(tiny_llama),
                                num_speculative_tokens=3, **FIXED))]
    for eng in engines:
        eng.add_adapter("attn", str(path))
    # mixed batch: the adapter and the base model; the draft drafts from the base model
    want, got = (eng.generate(ps, sp, adapters=["attn", None, "attn"]) for eng in engines)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(idle(e) for e in engines)
    c = engines[1].spec.counters
    assert 0 < c.accepted_tokens < c.draft_tokens  # the adapter's rows disagree with the base draft
