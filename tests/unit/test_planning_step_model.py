"""The step-time model: least-squares fit with its error, the roofline, and
the closed forms the simulator's coalesced decode runs use."""

import dataclasses
import math
import random

import pytest

from splitserve.cluster.planning.hardware import catalog
from splitserve.cluster.planning.records import EngineSettings, StepSample
from splitserve.cluster.planning.shapes import PRESETS
from splitserve.cluster.planning.step_model import StepModelError, StepTimeModel, evaluate, fit, roofline

TRUE = (0.002, 2e-5, 1e-8, 3e-4, 2e-7)  # (c, per prompt token, per pair, per decode seq, per context)


def rows(noise=0.0, seed=0):
    rng = random.Random(seed)
    out = []
    for p in (0, 16, 64, 256):
        for cached in (0, 128):
            for b in (0, 1, 8, 32):
                for ctx in (64, 512):
                    if p == 0 and b == 0:
                        continue
                    attn = p * (cached + (p + 1) / 2) if p else 0.0
                    c = b * ctx
                    t = TRUE[0] + TRUE[1] * p + TRUE[2] * attn + TRUE[3] * b + TRUE[4] * c
                    out.append(StepSample(p, attn, 1 if p else 0, b, c,
                                          t * (1 + rng.gauss(0, noise))))
    return out


def test_fit_recovers_the_coefficients_exactly_without_noise():
    m = fit(rows())
    assert m.fit.max_abs_rel_error < 1e-6 and m.fit.r2 > 0.999999
    for got, want in zip(m.forms[0], TRUE):
        assert got == pytest.approx(want, rel=1e-4)


def test_fit_reports_its_error_under_noise():
    m = fit(rows(noise=0.05))
    assert 0.01 < m.fit.mean_abs_rel_error < 0.08
    assert evaluate(m, rows(noise=0.05, seed=1)).mean_abs_rel_error < 0.1
    assert "mean |error|" in m.describe()


def test_fit_weights_are_never_negative():
    # a column that only adds noise must not get a negative weight
    data = [StepSample(0, 0.0, 0, b, 0, 0.01 + 1e-3 * b) for b in (1, 2, 4, 8, 16)]
    assert all(w >= 0 for w in fit(data).forms[0])


def test_fit_needs_three_rows():
    with pytest.raises(StepModelError, match="at least 3"):
        fit(rows()[:2])


@pytest.mark.parametrize("forms", [
    (TRUE,),
    ((0.004, 0, 0, 0, 5e-6), (0.001, 1e-5, 1e-8, 2e-4, 1e-6)),
    ((0.030, 0, 0, 0, 0.0), (0.001, 0, 0, 0, 2e-7)),  # memory overtakes compute mid-run
    ((0.001, 0, 0, 0, 0.0), (0.0, 0, 0, 0, 1e-7), (0.02, 0, 0, 0, 1e-9)),  # three forms
])
def test_decode_runs_sum_their_steps(forms):
    m = StepTimeModel(forms=forms, overhead_s=0.0005)
    for b, c, k in ((1, 100, 1), (7, 1000, 37), (64, 64 * 900, 500), (3, 0, 2000)):
        want = sum(m.step_s(0, 0, b, c + i * b) for i in range(k))
        assert m.decode_run_s(b, c, k) == pytest.approx(want, rel=1e-9)
        run = m.decode_run_s(b, c, k)
        assert m.decode_steps_within(b, c, run) == k
        assert m.decode_steps_within(b, c, run * (1 - 1e-9)) == k - 1


def test_roofline_of_llama_8b_on_h100():
    h100 = catalog()["h100-sxm"]
    m = roofline(PRESETS["llama-3.1-8b"], h100, EngineSettings())
    eff = h100.efficiency
    # decode of one sequence: weight bytes / achievable bandwidth (+ overhead)
    weights = PRESETS["llama-3.1-8b"].num_params * 2
    assert m.step_s(0, 0, 1, 100) == pytest.approx(
        eff.step_overhead_s + weights / (3.35e12 * eff.memory), rel=0.01)
    # a 4096-token prompt is compute-bound: ~2 x active params x tokens / achievable FLOP/s
    flops = 2 * PRESETS["llama-3.1-8b"].active_params_per_token * 4096
    assert m.step_s(4096, 4096 * 2048.5, 0, 0) > flops / (989.4e12 * eff.matmul)
    # H200's bandwidth makes decode faster, A100's FLOPs make prefill slower
    h200 = roofline(PRESETS["llama-3.1-8b"], catalog()["h200"], EngineSettings())
    a100 = roofline(PRESETS["llama-3.1-8b"], catalog()["a100-80gb"], EngineSettings())
    assert h200.step_s(0, 0, 16, 16 * 2000) < m.step_s(0, 0, 16, 16 * 2000)
    assert a100.step_s(4096, 8e6, 0, 0) > 2.5 * m.step_s(4096, 8e6, 0, 0)
    assert math.isclose(m.decode_run_s(1, 100, 1), m.step_s(0, 0, 1, 100))


def test_tensor_parallel_replicas_are_faster_but_not_linearly():
    shape, hw = PRESETS["llama-3.1-70b"], catalog()["h100-sxm"]
    one = roofline(shape, hw, EngineSettings(tensor_parallel=1)).step_s(0, 0, 32, 32 * 1000)
    four = roofline(shape, hw, EngineSettings(tensor_parallel=4)).step_s(0, 0, 32, 32 * 1000)
    assert one / 4 < four < one / 3


def test_a_mixture_of_experts_reads_the_experts_its_tokens_choose():
    # Mixtral (8 experts, 2 per token): a decode step of one sequence reads 2 of 8
    # experts, of 4 sequences 1 - (3/4)^4 of them, a prompt chunk all; the memory
    # form's constant is every weight, less the routed read the tokens skip
    h100, shape = catalog()["h100-sxm"], PRESETS["mixtral-8x7b"]
    m = roofline(shape, h100, EngineSettings())
    bw = h100.memory_bandwidth * h100.efficiency.memory
    routed = 32 * 8 * 3 * 4096 * 14336 * 2 / bw  # every expert's bytes, in seconds
    rest = (shape.num_params * 2 - 32 * 8 * 3 * 4096 * 14336 * 2) / bw
    assert m.routed_s == pytest.approx(routed) and m.expert_pass == 0.75
    kv = shape.kv_bytes_per_token("bfloat16") / bw
    for b in (1, 4, 16):
        read = rest + routed * (1 - 0.75 ** b)
        assert m.step_s(0, 0, b, b * 100) == pytest.approx(
            h100.efficiency.step_overhead_s + read + kv * (b + b * 100), rel=1e-9)
    # batch 1 reads about a third of what reading every weight per step takes
    dense = dataclasses.replace(m, routed_s=0.0)
    assert m.step_s(0, 0, 1, 100) < 0.4 * dense.step_s(0, 0, 1, 100)
    # a 512-token prompt chunk reads every expert: as the dense arithmetic, to 1e-9
    assert m.step_s(512, 512 * 256.5, 0, 0) == pytest.approx(dense.step_s(512, 512 * 256.5, 0, 0))
    # and a coalesced decode run is still the sum of its steps
    for b, c, k in ((1, 100, 50), (6, 6000, 300)):
        want = sum(m.step_s(0, 0, b, c + i * b) for i in range(k))
        assert m.decode_run_s(b, c, k) == pytest.approx(want, rel=1e-9)


def test_a_three_form_model_skips_the_routed_read_on_its_form():
    m = StepTimeModel(forms=((0.0, 1e-5, 0, 1e-5, 0), (0.02, 0, 0, 0, 1e-7), (0.001, 0, 0, 0, 0)),
                      overhead_s=0.0005, routed_s=0.015, expert_pass=0.9)
    for b, c, k in ((1, 100, 40), (30, 3000, 200)):
        want = sum(m.step_s(0, 0, b, c + i * b) for i in range(k))
        assert m.decode_run_s(b, c, k) == pytest.approx(want, rel=1e-9)
    assert m.step_s(0, 0, 1, 0) == pytest.approx(0.0005 + 0.02 - 0.015 * 0.9)
