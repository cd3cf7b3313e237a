"""The plain-Python parts of speculative decoding: prompt lookup, the
speculation length rule, draft scheduling and KV rollback, output merging."""

import pytest

from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import Sequence
from splitserve.engine.spec.adaptive import (AcceptanceTracker, LengthRule, StepCurve,
                                             choose_num_tokens, default_step_curve,
                                             expected_tokens, step_cost, step_curve)
from splitserve.engine.spec.config import SpeculativeConfig
from splitserve.engine.spec.decoder import merge_outputs
from splitserve.engine.spec.ngram import ngram_lookup
from splitserve.engine.spec.proposer import PROPOSERS, make_proposer


def test_ngram_lookup_prefers_the_longest_suffix_and_latest_occurrence():
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1, 2, 3] occurs at 0: the tokens after it
    assert ngram_lookup(tokens, 1, 3, 4) == [9, 2, 3, 7]
    # only suffixes up to 2 long: [2, 3] last occurred at 4 -> [7, 8, 1]
    assert ngram_lookup(tokens, 1, 2, 3) == [7, 8, 1]
    assert ngram_lookup([5, 6, 7], 1, 3, 4) == []  # no earlier occurrence
    assert ngram_lookup([4, 4, 4, 4], 2, 2, 5) == [4]  # overlapping the suffix, one follows
    assert ngram_lookup(tokens, 1, 3, 0) == []


def test_ngram_lookup_ignores_matches_across_token_boundaries():
    # bytes of [256, 1] contain those of [1, 0] at an unaligned offset (little endian)
    assert ngram_lookup([256, 1, 0, 0, 9, 1, 0], 2, 2, 2) == [0, 9]
    assert ngram_lookup([256, 1, 0, 0, 1, 0], 2, 2, 2) == [0, 1]


def test_speculation_length_rule():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    # a small batch whose verify tokens fit the free region speculates fully
    assert choose_num_tokens(4, 1, 0.7, 256) == 4
    # once B * (k + 1) passes the saturation point each extra draft must pay for itself
    assert choose_num_tokens(4, 64, 0.7, 256) == 3
    assert choose_num_tokens(4, 256, 0.7, 256) == 0
    assert choose_num_tokens(4, 128, 0.5, 256) == 1  # the verify step doubles: one draft pays
    # nothing accepted: nothing gained, and a costly draft model stops earlier still
    assert choose_num_tokens(4, 1, 0.0, 256) == 0
    assert choose_num_tokens(4, 1, 0.6, 256, draft_ratio=0.5) < 4
    assert choose_num_tokens(4, 8, 0.9, 256, disable_batch_size=4) == 0
    t = AcceptanceTracker(prior=0.5)
    t.observe(proposed=10, accepted=10, draft_s=0.6, step_s=1.0, rejected=0)
    # no one step sets the rate alone: a fifth of the way to what it saw
    assert t.alpha == pytest.approx(0.6) and t.draft_ratio == pytest.approx(0.3)  # pooled with the prior 0
    # ten sequences, each cut at its first draft; drafting not timed
    t.observe(proposed=10, accepted=0, draft_s=None, step_s=1.0, rejected=10)
    assert t.alpha == pytest.approx(0.48) and t.draft_ratio == pytest.approx(0.3)
    t.observe(proposed=1, accepted=0, draft_s=None, step_s=1.0, rejected=1)
    assert t.alpha == pytest.approx(0.48 * 0.95)  # one judged draft moves it by its weight
    # a draft as slow as the target never pays, even accepted every time
    assert choose_num_tokens(4, 1, 1.0, 256, draft_ratio=1.0) == 0


def test_the_tracker_measures_the_per_token_rate_at_any_length():
    # drafts accepted at 0.8 while the ones before them were: the share of
    # drafted tokens accepted falls with the length (0.66 at k = 4, 0.49 at
    # k = 8), the rate over judged drafts does not
    import random

    for k in (1, 4, 8):
        t, rng = AcceptanceTracker(prior=0.5, acceptance_weight=0.01), random.Random(k)
        for _ in range(3000):
            acc = 0
            while acc < k and rng.random() < 0.8:
                acc += 1
            t.observe(proposed=k, accepted=acc, draft_s=None, step_s=1.0, rejected=int(acc < k))
        assert t.alpha == pytest.approx(0.8, abs=0.04), k
    # a sequence that finished on an accepted draft judged no further drafts
    t = AcceptanceTracker(prior=0.5)
    t.observe(proposed=4, accepted=2, draft_s=None, step_s=1.0, rejected=0)
    assert t.alpha == pytest.approx(0.5 + 0.1 * 0.5)  # two judged, both accepted


def test_a_lookup_is_charged_once_per_step_not_per_draft_position():
    # at a low acceptance each further draft adds little; charging a
    # lookup's time once per draft position stops the run early, though
    # finding 7 tokens costs what finding 3 does
    assert choose_num_tokens(8, 1, 0.2, 8, draft_ratio=0.001) < 7
    assert choose_num_tokens(8, 1, 0.2, 8, draft_ratio=0.001, per_position=False) == 7
    # a lookup that costs as much as the verify step gains still stops it
    assert choose_num_tokens(8, 1, 0.2, 8, draft_ratio=0.3, per_position=False) == 0
    assert step_cost(1, 4, 8, 0.1, per_position=False) == pytest.approx(1.1)
    assert step_cost(1, 4, 8, 0.1) == pytest.approx(1.4)
    rule = LengthRule(8, 8, per_position=False, tracker=AcceptanceTracker(prior=0.2,
                                                                          cost_prior=0.001))
    assert rule.length(1, True) == 7


def test_ngram_engine_charges_its_lookup_per_step(tiny_llama):
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=str(tiny_llama), num_blocks=64, block_size=4,
                                 speculative=SpeculativeConfig(method="ngram")))
    assert eng.spec.proposer.cost_per_position is False
    assert eng.spec.rule.per_position is False


def test_one_slow_step_does_not_decide_the_draft_cost():
    # a first step 5x a target step (a stall, or one-off work timed with it)
    # must leave the draft speculating once cheap steps follow; setting the
    # ratio from that step alone switched a useful draft off for good
    t = AcceptanceTracker(prior=0.5)
    t.observe(proposed=4, accepted=2, draft_s=5.0, step_s=1.0, rejected=1)
    assert t.draft_ratio == pytest.approx(2.5)
    for _ in range(6):
        t.observe(proposed=4, accepted=2, draft_s=0.05, step_s=1.0, rejected=1)
    assert t.draft_ratio == pytest.approx((5.0 + 6 * 0.05) / 8)  # the mean, prior included
    for _ in range(40):  # then an exponential moving average
        t.observe(proposed=4, accepted=2, draft_s=0.05, step_s=1.0, rejected=1)
    assert t.draft_ratio < 0.1
    assert choose_num_tokens(4, 1, t.alpha, 256, t.draft_ratio) > 0


def test_step_curve_by_device():
    # a GPU verifies a few hundred tokens for the price of one: a knee
    gpu, cpu = default_step_curve("cuda"), default_step_curve("cpu")
    assert gpu == StepCurve(saturation_tokens=256) == step_curve(None, "cuda")
    assert step_curve(None, "cpu") == cpu
    assert step_curve(300, "cpu") == StepCurve(saturation_tokens=300)  # the operator's knee
    assert SpeculativeConfig().saturation_tokens is None  # resolved by the engine's device
    # a CPU's verify forwards as measured (bench_spec --step-costs, default
    # model, one thread): the curve within 11%, where a knee at 8 tokens put
    # eight sequences with 4 drafts each at 5x a plain step
    measured = {(1, 4): 1.26, (1, 8): 1.42, (2, 4): 1.37, (8, 1): 1.18, (8, 4): 1.48,
                (8, 12): 2.40, (32, 1): 1.25, (32, 4): 2.08, (32, 12): 4.32}
    for (b, k), m in measured.items():
        forward = step_cost(b, k, cpu, 0.0) - cpu.verify
        assert forward == pytest.approx(m, rel=0.11), (b, k)
    assert step_cost(8, 4, 8, 0.0) == 5.0
    # and the verify step's own work beyond its forward: prompt lookup on free
    # text (about 0.5 accepted) stays off from 8 sequences on, where it cost
    # 12-16% when only the forward was counted; where the output copies the
    # prompt it verifies the full length
    assert cpu.verify == 0.5 and gpu.verify == 0.0
    for batch in (8, 32):
        assert choose_num_tokens(4, batch, 0.5, cpu) == 0
        assert choose_num_tokens(4, batch, 0.9, cpu) == 4
    assert choose_num_tokens(4, 32, 0.7, cpu) == 3
    assert choose_num_tokens(4, 32, 0.5, gpu) == 4  # under the GPU's knee: the full length
    # every draft accepted pays at any batch a CPU runs: the rule probes there
    assert not LengthRule(8, cpu).quiet(32)
    assert LengthRule(8, 1).quiet(32)  # a knee of one token: no acceptance pays
    # a batch of one verifies longer runs as the acceptance grows, none below 0.5
    assert choose_num_tokens(8, 1, 0.4, cpu) == 0
    assert choose_num_tokens(8, 1, 0.6, cpu) == 5
    assert choose_num_tokens(8, 1, 0.9, cpu) == 8


def test_config_checks_and_registry():
    assert type(make_proposer(SpeculativeConfig(), None)).__name__ == "NgramProposer"
    assert {"ngram", "draft"} <= set(PROPOSERS)  # registered by name
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ValueError, match="ngram_min"):
        SpeculativeConfig(ngram_min=3, ngram_max=2)
    with pytest.raises(ValueError, match="unknown speculative method"):
        make_proposer(SpeculativeConfig(method="eagle9"), None)


def decoding(s, prompt_lens, bs=4):
    """Sequences whose prompts ran and whose first token was sampled."""
    seqs = [Sequence(f"s{i}", list(range(n)), None, bs) for i, n in enumerate(prompt_lens)]
    for seq in seqs:
        s.add(seq)
    s.commit(s.schedule())
    for seq in seqs:
        seq.append_token(7)
    return seqs


def test_drafts_ride_with_the_last_token_and_are_cut_to_the_budget():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    s = Scheduler(kv, 8, 4)
    (a,) = decoding(s, [4])  # 5 tokens, 4 computed
    out = s.schedule({"s0": [1, 2, 3, 4, 5]})
    (x,) = out.scheduled
    assert x.spec_token_ids == [1, 2, 3] and x.num_new_tokens == 4 and x.completes
    assert len(kv.block_table("s0")) == 2  # positions 4..7
    s.commit(out)
    assert a.num_computed_tokens == 5  # drafts count once verified
    # one draft accepted, then the target's token: 7 tokens, 6 with KV
    a.num_computed_tokens += 1
    a.append_token(1)
    a.append_token(9)
    assert kv.trim("s0", a.num_tokens) == 0  # block 1 holds positions 4..7: kept
    kv.check_invariants()


def test_rejected_drafts_give_their_blocks_back_and_never_cause_preemption():
    kv = KVCacheManager(4, 4, enable_prefix_caching=False)
    s = Scheduler(kv, 8, 64)
    a, b = decoding(s, [4, 2])  # one block each
    assert kv.num_free_blocks == 2
    out = s.schedule({"s0": [1] * 8, "s1": [2, 2]})  # a's drafts need 3 more blocks: dropped
    got = {x.seq.seq_id: x.spec_token_ids for x in out.scheduled}
    assert got == {"s0": [], "s1": [2, 2]} and not out.preempted
    assert kv.num_free_blocks == 0
    s.commit(out)
    b.append_token(5)  # every draft rejected: 4 tokens, 3 with KV
    assert kv.trim("s1", b.num_tokens) == 1  # the block taken for position 4 is free again
    assert kv.num_free_blocks == 1
    kv.check_invariants()


def out(rid, toks, text, finished=False, error=None, lps=None):
    return RequestOutput(rid, toks, text, finished, "stop" if finished else None, 3, len(toks),
                         new_logprobs=lps, error=error)


def test_merge_outputs_joins_one_requests_step():
    merged = merge_outputs([out("a", [1], "x", lps=["l1"]), out("b", [5], "q"),
                            out("a", [2], "y", lps=["l2"]), out("a", [3], "z", finished=True)])
    assert [(m.request_id, m.new_token_ids, m.new_text, m.finished) for m in merged] == [
        ("a", [1, 2, 3], "xyz", True), ("b", [5], "q", False)]
    assert merged[0].new_logprobs == ["l1", "l2"]
    err = merge_outputs([out("a", [1], "x"), out("a", [], "", True, error=ValueError("boom"))])
    assert len(err) == 2 and err[1].error is not None
