import math
from collections import Counter

import pytest
import torch

from splitserve.cluster.api.openai_api import choice_params
from splitserve.engine.hashing import MASK64, SPLITMIX_GOLDEN, splitmix64
from splitserve.engine.sampler import Sampler, SeqSamplingState, TokenLogprobs, hashed_exponential
from splitserve.engine.sampling_params import SamplingParams

# Probabilities of a constructed 8-token distribution, in a shuffled vocab order.
PROBS = [0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.02, 0.01]
PERM = [5, 2, 7, 0, 3, 6, 1, 4]  # PROBS[j] belongs to token PERM[j]


def constructed_logits() -> list[float]:
    row = [0.0] * len(PROBS)
    for j, tok in enumerate(PERM):
        row[tok] = math.log(PROBS[j]) + 1.7  # an offset softmax must not care about
    return row


def state(params: SamplingParams, prompt=(), output=(), eos=()) -> SeqSamplingState:
    st = SeqSamplingState.create(params, list(prompt), eos_token_ids=tuple(eos))
    st.output_ids = list(output)
    return st


# ---- reference computations, written directly over Python floats ----

def ref_penalised(row, p: SamplingParams, prompt, output, eos) -> list[float]:
    x = list(row)
    for t, b in p.logit_bias.items():
        if t < len(x):
            x[t] += b
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    for t, c in Counter(output).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = -math.inf
    return x


def ref_log_softmax(x) -> list[float]:
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


def ref_distribution(row, temperature, top_k=-1, top_p=1.0, min_p=0.0) -> dict[int, float]:
    """Token -> probability after temperature, top_k, top_p and min_p."""
    z = [v / temperature for v in row]
    keep = set(range(len(z)))
    if top_k > 0:
        kth = sorted(z, reverse=True)[top_k - 1]
        keep = {i for i in keep if z[i] >= kth}

    def renorm(ids):
        m = max(z[i] for i in ids)
        w = {i: math.exp(z[i] - m) for i in ids}
        s = sum(w.values())
        return {i: v / s for i, v in w.items()}

    probs = renorm(keep)
    if top_p < 1.0:
        kept, mass = [], 0.0
        for i in sorted(probs, key=probs.get, reverse=True):
            if mass >= top_p:
                break
            kept.append(i)
            mass += probs[i]
        probs = renorm(kept)
    if min_p > 0.0:
        top = max(probs.values())
        probs = renorm([i for i, v in probs.items() if v >= min_p * top])
    return probs


# ---- greedy ----

def test_greedy_rows_take_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    states = [state(SamplingParams(temperature=0.0)) for _ in range(6)]
    tokens, logprobs = Sampler(seed=0)(logits, states)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 6


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_top_k_one_equals_greedy(temperature):
    torch.manual_seed(1)
    logits = torch.randn(20, 50)
    states = [state(SamplingParams(temperature=temperature, top_k=1)) for _ in range(20)]
    tokens, _ = Sampler(seed=3)(logits, states)
    assert tokens == logits.argmax(dim=-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    torch.manual_seed(2)
    logits = torch.randn(5, 40)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.9, seed=4),
              SamplingParams(temperature=0.0)]
    tokens, logprobs = Sampler(seed=0)(logits, [state(p) for p in params])
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]
    assert [lp is None for lp in logprobs] == [True, True, False, True, True]
    assert logprobs[2].token_id == argmax[2]


# ---- truncation: exact support over 2000 samples ----

TRUNCATION_CASES = [
    {"temperature": 1.0},
    {"temperature": 1.0, "top_k": 3},
    {"temperature": 1.0, "top_k": 0},
    {"temperature": 1.0, "top_p": 0.5},
    {"temperature": 1.0, "top_p": 0.76},
    {"temperature": 1.0, "min_p": 0.3},
    {"temperature": 1.0, "top_k": 5, "top_p": 0.8},
    {"temperature": 0.5, "top_p": 0.8},
    {"temperature": 2.0, "top_p": 0.5},
    {"temperature": 1.5, "top_k": 6, "min_p": 0.4},
    {"temperature": 1.0, "top_k": 6, "top_p": 0.9, "min_p": 0.5},
]


@pytest.mark.parametrize("kwargs", TRUNCATION_CASES)
@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_support_is_exactly_the_truncated_set(kwargs, seeded):
    row = constructed_logits()
    expected = ref_distribution(row, **kwargs)
    assert min(expected.values()) > 0.005  # every kept token shows up in 2000 draws
    n = 2000
    logits = torch.tensor([row] * n)
    states = [state(SamplingParams(seed=i if seeded else None, **kwargs)) for i in range(n)]
    tokens, _ = Sampler(seed=11)(logits, states)
    assert set(tokens) == set(expected)


@pytest.mark.parametrize("seeded", [False, True])
def test_sampling_frequencies_match_the_distribution(seeded):
    row = constructed_logits()
    kwargs = {"temperature": 0.8, "top_k": 5}
    expected = ref_distribution(row, **kwargs)
    n = 20000
    states = [state(SamplingParams(seed=i if seeded else None, **kwargs)) for i in range(n)]
    tokens, _ = Sampler(seed=5)(torch.tensor([row] * n), states)
    counts = Counter(tokens)
    for tok, p in expected.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[tok] - n * p) < 5 * sigma, (tok, counts[tok], n * p)
    assert set(counts) == set(expected)


# ---- seeds ----

def run_steps(seed_params, steps, logits_per_step, batch_before=0, batch_after=0,
              sampler_seed=0):
    """Sample `steps` tokens for one sequence placed among unrelated rows."""
    sampler = Sampler(seed=sampler_seed)
    target = state(seed_params, prompt=[1, 2])
    others = [state(SamplingParams(temperature=1.0, seed=(900 + i) if i % 2 else None))
              for i in range(batch_before + batch_after)]
    out = []
    for step in range(steps):
        rows = others[:batch_before] + [target] + others[batch_before:]
        noise_rows = torch.randn(len(rows), logits_per_step.shape[1]) * 3
        noise_rows[batch_before] = logits_per_step[step]
        tokens, _ = sampler(noise_rows, rows)
        target.output_ids.append(tokens[batch_before])
        for i, st in enumerate(rows):
            if st is not target:
                st.output_ids.append(tokens[i])
        out.append(tokens[batch_before])
    return out


@pytest.fixture
def step_logits():
    g = torch.Generator().manual_seed(42)
    return torch.randn(12, 64, generator=g)


def test_seeded_sequence_is_reproducible_and_independent_of_batch(step_logits):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = run_steps(p, 12, step_logits)
    assert run_steps(p, 12, step_logits) == alone
    assert run_steps(p, 12, step_logits, batch_before=3, batch_after=2, sampler_seed=7) == alone
    assert run_steps(p, 12, step_logits, batch_before=0, batch_after=6, sampler_seed=8) == alone


def test_seeded_sequences_differ_by_seed_and_sibling_choice(step_logits):
    # choice i of an n-choice request runs as its own request (choice_params)
    p = SamplingParams(temperature=1.0, seed=1, n=2)
    a = run_steps(choice_params(p, 0), 12, step_logits)
    b = run_steps(SamplingParams(temperature=1.0, seed=2), 12, step_logits)
    c = run_steps(choice_params(p, 1), 12, step_logits)
    assert a == run_steps(SamplingParams(temperature=1.0, seed=1), 12, step_logits)
    assert a != b and a != c and b != c


def test_seeded_step_depends_only_on_position(step_logits):
    p = SamplingParams(temperature=1.0, seed=99)
    full = run_steps(p, 12, step_logits)
    # A replica that picks the sequence up at step 7 (hand-off, or recompute
    # after preemption) with its own, differently seeded sampler.
    st = state(p, prompt=[1, 2], output=full[:7])
    tokens, _ = Sampler(seed=123456)(step_logits[7:8], [st])
    assert tokens == [full[7]]


def test_hashed_noise_is_the_uint64_hash_bit_for_bit():
    seeds = [0, 1, (1 << 63) + 12345, (1 << 64) - 1]
    noise = hashed_exponential(seeds, 300, torch.device("cpu"))
    for r, seed in enumerate(seeds):
        for j in (0, 1, 17, 299):
            z = splitmix64((seed + j * SPLITMIX_GOLDEN) & MASK64)
            u = ((z >> 40) + 0.5) / (1 << 24)
            assert noise[r, j].item() == pytest.approx(-math.log(u), rel=1e-6)


def test_hashed_noise_is_exponential_and_rows_are_independent():
    noise = hashed_exponential([7, 8], 200_000, torch.device("cpu"))
    assert noise.min() > 0
    for row in noise:
        assert abs(row.mean().item() - 1.0) < 0.01  # Exp(1): mean 1, sd 1/sqrt(n) ~ 0.002
        assert abs((row > 1).float().mean().item() - math.exp(-1)) < 0.005
    assert torch.corrcoef(noise)[0, 1].abs() < 0.01


def test_unseeded_sampler_seed_makes_runs_repeatable():
    torch.manual_seed(3)
    logits = torch.randn(16, 30)
    states = [state(SamplingParams(temperature=1.0)) for _ in range(16)]
    assert Sampler(seed=21)(logits, states)[0] == Sampler(seed=21)(logits, states)[0]


# ---- penalties, min_tokens and logprobs against direct computation ----

PENALTY_CASES = [
    (SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=20), [1, 4, 4, 9], [4, 12, 3]),
    (SamplingParams(temperature=0.0, repetition_penalty=0.7, logprobs=20), [2, 5], [5, 5, 17]),
    (SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5, logprobs=20),
     [7, 7, 8], [3, 3, 3, 11, 8]),
    (SamplingParams(temperature=0.7, presence_penalty=-1.0, frequency_penalty=-0.3,
                    repetition_penalty=1.3, logprobs=20), [0, 19], [19, 19, 6, 2]),
    (SamplingParams(temperature=0.0, logprobs=20), [1, 2, 3], [3, 2]),
]


def test_penalties_match_direct_computation():
    torch.manual_seed(4)
    logits = torch.randn(len(PENALTY_CASES), 20) * 2  # both signs, so both penalty branches run
    before = logits.clone()
    states = [state(p, prompt, output) for p, prompt, output in PENALTY_CASES]
    tokens, logprobs = Sampler(seed=0)(logits, states)
    assert torch.equal(logits, before)  # the caller's logits are not modified
    for i, (p, prompt, output) in enumerate(PENALTY_CASES):
        ref = ref_log_softmax(ref_penalised(logits[i].tolist(), p, prompt, output, ()))
        got = dict(logprobs[i].top)
        assert sorted(got) == list(range(20))
        for t in range(20):
            assert got[t] == pytest.approx(ref[t], abs=1e-5)
        if p.greedy:
            assert tokens[i] == max(range(20), key=ref.__getitem__)
        assert logprobs[i].logprob == pytest.approx(ref[tokens[i]], abs=1e-5)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos):
    row = [0.0] * 10
    row[0], row[3], row[6] = 9.0, 8.0, 1.0  # EOS 0 then stop id 3 would win
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=ignore_eos,
                       logprobs=10)
    logits = torch.tensor([row] * 3)
    states = [state(p, prompt=[5], output=[6] * k, eos=[0]) for k in (0, 1, 2)]
    tokens, logprobs = Sampler(seed=0)(logits, states)
    for k in (0, 1):
        top = dict(logprobs[k].top)
        assert top[3] == -math.inf
        assert (top[0] == -math.inf) is not ignore_eos
        assert tokens[k] == (0 if ignore_eos else 6)
    assert tokens[2] == 0  # min_tokens reached: nothing masked
    assert dict(logprobs[2].top)[0] == pytest.approx(ref_log_softmax(row)[0], abs=1e-6)


def test_logprobs_are_before_temperature_and_sorted():
    torch.manual_seed(6)
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=0.4, top_p=0.5, logprobs=5),
              SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=1.3, top_k=3, logprobs=20),
              SamplingParams(temperature=1.0)]
    tokens, logprobs = Sampler(seed=2)(logits, [state(p) for p in params])
    assert logprobs[3] is None
    for i in range(3):
        ref = ref_log_softmax(logits[i].tolist())
        lp = logprobs[i]
        assert isinstance(lp, TokenLogprobs)
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(ref[tokens[i]], abs=1e-5)
        n = params[i].logprobs
        expected_ids = sorted(range(30), key=ref.__getitem__, reverse=True)[:n]
        assert [t for t, _ in lp.top] == expected_ids
        assert [v for _, v in lp.top] == pytest.approx([ref[t] for t in expected_ids], abs=1e-5)
    assert logprobs[1].top == []


def test_shape_mismatch_and_empty_batch():
    with pytest.raises(ValueError, match="one row per state"):
        Sampler()(torch.zeros(2, 5), [state(SamplingParams())])
    assert Sampler()(torch.zeros(0, 5), []) == ([], [])


def test_penalties_follow_outputs_growing_step_by_step():
    """The incremental output buffer sees every appended token, grows past its
    capacity, and starts over when the state gets a different list (shorter,
    or as long with other tokens)."""
    p = SamplingParams(temperature=0.0, presence_penalty=0.8, frequency_penalty=0.4,
                       repetition_penalty=1.2, logprobs=20)
    torch.manual_seed(5)
    logits = torch.randn(1, 20) * 2
    st = state(p, [1, 2], [])
    smp = Sampler(seed=0)
    rng = torch.Generator().manual_seed(6)
    for step in range(40):  # past the buffer's first capacity of 16
        if step == 20:
            st.output_ids = [(t + 1) % 20 for t in st.output_ids]  # a new list, as long
        if step == 30:
            st.output_ids = st.output_ids[:5]  # a new list, shorter
        _, lps = smp(logits, [st])
        ref = ref_log_softmax(ref_penalised(logits[0].tolist(), p, [1, 2], st.output_ids, ()))
        got = dict(lps[0].top)
        assert all(got[t] == pytest.approx(ref[t], abs=1e-5) for t in range(20)), step
        st.output_ids.append(int(torch.randint(0, 20, (1,), generator=rng)))


def test_logit_bias_matches_direct_computation_before_the_penalties():
    torch.manual_seed(7)
    logits = torch.randn(4, 20) * 2
    before = logits.clone()
    cases = [
        (SamplingParams(temperature=0.0, logprobs=20, logit_bias={3: 5.0, 11: -2.5}), [1], [3]),
        # the bias lands first, then the repetition penalty divides the biased logit
        (SamplingParams(temperature=0.0, logprobs=20, logit_bias={4: 3.0},
                        repetition_penalty=1.5, frequency_penalty=0.5), [4], [4, 4]),
        (SamplingParams(temperature=0.0, logprobs=20), [1], []),  # no bias: untouched row
        # an id past the logits' width is skipped, not indexed
        (SamplingParams(temperature=0.7, seed=1, logprobs=20, logit_bias={2: 1.0, 99: 50.0}),
         [], []),
    ]
    states = [state(p, prompt, output) for p, prompt, output in cases]
    tokens, logprobs = Sampler(seed=0)(logits, states)
    assert torch.equal(logits, before)
    for i, (p, prompt, output) in enumerate(cases):
        ref = ref_log_softmax(ref_penalised(logits[i].tolist(), p, prompt, output, ()))
        got = dict(logprobs[i].top)
        for t in range(20):
            assert got[t] == pytest.approx(ref[t], abs=1e-5)
        if p.greedy:
            assert tokens[i] == max(range(20), key=ref.__getitem__)


def test_logit_bias_of_100_forces_and_of_minus_100_bans_a_token():
    torch.manual_seed(8)
    logits = torch.randn(3, 50) * 3
    top = int(logits[0].argmax())
    forced, banned = (top + 1) % 50, top
    greedy = SamplingParams(temperature=0.0)
    sampled = SamplingParams(temperature=1.0, seed=3, logit_bias={forced: 100.0})
    rows = [state(SamplingParams(temperature=0.0, logit_bias={forced: 100.0})),
            state(SamplingParams(temperature=0.0, logit_bias={banned: -100.0})),
            state(sampled)]
    for step in range(5):
        tokens, _ = Sampler(seed=step)(logits, rows)
        assert tokens[0] == forced and tokens[1] != banned and tokens[2] == forced
    plain, _ = Sampler(seed=0)(logits[:1], [state(greedy)])
    assert plain == [top]
