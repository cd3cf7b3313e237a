"""FP8-weight GEMMs: the torch references against unquantized float64
matmuls, the Triton kernels (interpreted on CPU) against the references,
the per-token activation quantizer byte for byte, the fp8 MoE kernel, and
dispatch.

Accuracy bounds (derived in kernels/fp8_gemm.py, checked per
output element here):

- quantization: each weight within half an e4m3 step of its value
  (``|w| * 2^-4``, or ``scale * 2^-10`` in the subnormal range); a product
  within ``sum_k e_x |w| + |x| e_w + e_x e_w`` of the unquantized one
  (``e_x = 0`` for weight-only), plus float32 summation slack;
- kernel against reference, fed the same fp8 bytes and scales: products are
  exact, only the float32 summation order and the final rounding differ:
  ``K * 2^-23 * sum_k |x~ w~|`` plus one ulp of the output dtype (the
  interpreter truncates where GPUs round when narrowing to 16 bits).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from splitserve.kernels import dispatch, fp8_gemm as ref, ops  # noqa: E402
from splitserve.kernels import reference  # noqa: E402
from splitserve.kernels.fp8_gemm import (  # noqa: E402
    dequantize_weight,
    gemm_rounding_bound,
    quantize_per_token,
    quantize_weight,
    rounding_bound,
    w8a8_error_bound,
    w8a16_error_bound,
    weight_rounding_bound,
)
from splitserve.kernels.triton import fp8_gemm as tri  # noqa: E402
from splitserve.kernels.triton.fused_moe import fp8_fused_moe  # noqa: E402

FP8 = torch.float8_e4m3fn
# (name, out features, in features, groups): ragged shapes, so edge groups are partial
LAYOUTS = {
    "tensor": (48, 80, (48, 80)),
    "channel": (48, 80, (1, 80)),
    "block": (70, 96, (32, 32)),
    "group": (40, 96, (1, 48)),
}


def data(m, n, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    # a spread of magnitudes, so groups get different scales and some values go subnormal
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, k)[torch.randperm(k, generator=g)] * 0.2
    bias = torch.randn(n, generator=g).to(dtype)
    return x, w, bias


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_quantization_round_trip(layout):
    n, k, groups = LAYOUTS[layout]
    _, w, _ = data(1, n, k)
    w8, scale = quantize_weight(w, *groups)
    assert w8.dtype == FP8 and scale.shape == ref.scale_shape(n, k, *groups)
    # bytes: round to nearest even of w / scale, what torch's own cast does
    per_elem = ref.expand_scale(scale, n, k, *groups)
    assert torch.equal(w8.view(torch.uint8), (w / per_elem).to(FP8).view(torch.uint8))
    err = (dequantize_weight(w8, scale, *groups) - w).abs()
    assert (err <= weight_rounding_bound(w, *groups)).all()
    assert (err <= rounding_bound(w, per_elem)).all()
    assert w8.float().abs().max() == 448  # the largest magnitude of some group lands on 448


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_gemms_within_quantization_bounds(layout):
    n, k, groups = LAYOUTS[layout]
    x, w, _ = data(7, n, k)
    w8, scale = quantize_weight(w, *groups)
    exact = x.double() @ w.double().T
    for fn, bound in ((ref.fp8_w8a16_linear, w8a16_error_bound), (ref.fp8_w8a8_linear, w8a8_error_bound)):
        err = (fn(x, w8, scale, *groups).double() - exact).abs()
        b = bound(x, w, *groups).double()
        assert (err <= b).all(), (fn.__name__, (err / b).max())
        assert (err <= 0.25 * b).any()  # the bound is not vacuous: some error comes near it...
    assert (err > 0).any()  # ...and the quantization error is real


def test_per_token_quantization_kernel_writes_the_reference_bytes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 300, generator=g) * torch.tensor([1e-3, 1.0, 50.0, 1e4, 0.0, 1.0])[:, None]
    x[5, 7] = 448.0 * 3  # a row whose maximum is exactly representable after scaling
    for dtype in (torch.float32, torch.bfloat16):
        got8, got_scale = tri.quantize_per_token(x.to(dtype))
        want8, want_scale = quantize_per_token(x.to(dtype))
        assert torch.equal(got8.view(torch.uint8), want8.view(torch.uint8)), dtype
        assert torch.equal(got_scale, want_scale), dtype
    assert torch.equal(want8[4].float(), torch.zeros(300))  # an all-zero row stays zero
    err = (want8.float() * want_scale[:, None] - x).abs()
    assert (err <= rounding_bound(x, want_scale[:, None])).all()


CASES = [(layout, torch.float32) for layout in LAYOUTS] + [
    ("channel", torch.bfloat16), ("block", torch.bfloat16), ("block", torch.float16)]


@pytest.mark.parametrize("layout, dtype", CASES)
@pytest.mark.parametrize("op", ["fp8_w8a16_linear", "fp8_w8a8_linear"])
def test_triton_kernels_match_reference(op, layout, dtype):
    n, k, groups = LAYOUTS[layout]
    x, w, bias = data(19, n, k, dtype)  # 19 rows: two row tiles, the second partial
    w8, scale = quantize_weight(w, *groups)
    got = getattr(tri, op)(x, w8, scale, *groups, bias)
    want = getattr(ref, op)(x, w8, scale, *groups, bias)
    assert got.dtype == dtype and got.shape == (19, n)
    xq = x.float() if op == "fp8_w8a16_linear" else quantize_per_token(x)[0].float() * quantize_per_token(x)[1][:, None]
    bound = gemm_rounding_bound(xq.abs(), dequantize_weight(w8, scale, *groups).abs(), dtype)
    bound += bias.float().abs() * 2 * ref._HALF_ULP[dtype]
    err = (got.float() - want.float()).abs()
    assert (err <= bound).all(), (err / bound).max()


def test_triton_gemm_edge_cases():
    x, w, _ = data(3, 48, 80)
    w8, scale = quantize_weight(w, 1, 80)
    assert tri.fp8_w8a16_linear(x[:0], w8, scale, 1, 80).shape == (0, 48)
    with pytest.raises(ValueError, match=r"weight_scale \(48, 1\) does not fit a \[48, 80\] weight in "
                       r"groups of \(32, 32\)"):
        tri.fp8_w8a16_linear(x, w8, scale, 32, 32)
    w8, scale = quantize_weight(w, 1, 8)
    with pytest.raises(ValueError, match="group_k=8 must be a multiple of 16"):
        tri.fp8_w8a8_linear(x, w8, scale, 1, 8)
    with pytest.raises(ValueError, match="weight has dtype torch.float32"):
        tri.fp8_w8a16_linear(x, w, scale, 1, 8)


def moe_problem(dtype, groups, seed=0):
    t, h, i, e, k = 9, 64, 48, 4, 2
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    weights, ids = torch.softmax(torch.randn(t, e, generator=g), -1).topk(k, -1)
    stacks = []
    for shape in ((e, 2 * i, h), (e, h, i)):
        w = torch.randn(*shape, generator=g) * shape[2] ** -0.5
        gr = groups if groups != "channel" else (1, shape[2])
        pairs = [quantize_weight(w[j], *gr) for j in range(e)]
        stacks += [torch.stack([a for a, _ in pairs]), torch.stack([s for _, s in pairs]), gr]
    return x, stacks, weights, ids


@pytest.mark.parametrize("groups, dtype", [("channel", torch.float32), ((32, 32), torch.float32),
                                           ((32, 32), torch.bfloat16)])
def test_fp8_moe(groups, dtype):
    x, (gu8, gus, gug, d8, ds, dg), weights, ids = moe_problem(dtype, groups)
    want = ref.fp8_fused_moe(x, gu8, gus, gug, d8, ds, dg, weights, ids)
    # the reference is fused_moe on the dequantized experts, to the bit
    deq = [torch.stack([dequantize_weight(w[j], s[j], *gr, dtype) for j in range(w.shape[0])])
           for w, s, gr in ((gu8, gus, gug), (d8, ds, dg))]
    assert torch.equal(want, reference.fused_moe(x, deq[0], deq[1], weights, ids))
    got = fp8_fused_moe(x, gu8, gus, gug, d8, ds, dg, weights, ids)
    # tolerances of tests/unit/test_moe_kernel.py: the kernel narrows to x.dtype where the reference does
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype] * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


def test_dispatch():
    cpu = torch.device("cpu")
    with dispatch.force_backend("triton"):
        assert dispatch.get_op("fp8_w8a8_linear", cpu) is tri.fp8_w8a8_linear
        assert dispatch.get_op("fp8_fused_moe", cpu) is fp8_fused_moe
    with dispatch.force_backend("reference"):
        assert dispatch.get_op("fp8_w8a16_linear", cpu) is ref.fp8_w8a16_linear
    # CPU default: the cpu backend's w8a16 (dequantize per call, then its linear);
    # w8a8 and the fp8 MoE run the references
    from splitserve.kernels import cpu_ops

    assert dispatch.get_op("fp8_w8a16_linear", cpu) is cpu_ops.fp8_w8a16_linear
    assert dispatch.get_op("fp8_w8a8_linear", cpu) is ref.fp8_w8a8_linear
    for n, k in ((48, 80), (8192, 64)):  # small, and a tall one (the weight-first matmul)
        x, w, bias = data(3, n, k)
        w8, scale = quantize_weight(w, 1, k)
        want = ref.fp8_w8a16_linear(x, w8, scale, 1, k, bias)
        torch.testing.assert_close(ops.fp8_w8a16_linear(x, w8, scale, 1, k, bias), want,
                                   atol=1e-5, rtol=1e-5)
