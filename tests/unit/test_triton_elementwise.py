"""Triton row-wise and cache-movement kernels against ``splitserve.kernels.reference``.

On CPU these run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Tolerances, stated per dtype:

- float32: 1e-5 relative and absolute (reduction order differs).
- float16: 2e-3 (two fp16 roundings, each at most 2^-11 relative).
- bfloat16: 1.6e-2 relative, 1e-2 absolute. The interpreter truncates when
  it narrows float32 to bfloat16 (hardware rounds to nearest), so one
  result may be a full bf16 step (2^-7 relative) from the reference plus the
  reference's own half step.
- Copies (store_kv without conversion, fp8 encoding, pack/unpack): exact.
"""

import pytest
import torch

pytest.importorskip("triton")

from splitserve.kernels import dispatch, ops  # noqa: E402
from splitserve.kernels import reference as ref  # noqa: E402
from splitserve.kernels.fp8 import (  # noqa: E402
    compute_kv_scale,
    dequantize_kv,
    kv_quantization_error_bound,
    quantize_kv,
)
from splitserve.kernels.triton.activation import gelu_tanh_and_mul, silu_and_mul  # noqa: E402
from splitserve.kernels.triton.decode_attention import paged_decode_attention  # noqa: E402
from splitserve.kernels.triton.kv_pack import pack_kv, unpack_kv  # noqa: E402
from splitserve.kernels.triton.kv_store import store_kv  # noqa: E402
from splitserve.kernels.triton.rmsnorm import rms_norm  # noqa: E402
from splitserve.kernels.triton.rope import rotary_embedding  # noqa: E402

FP8 = torch.float8_e4m3fn
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
DTYPES = list(TOL)


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d", [(1, 16), (5, 48), (3, 96)])
def test_rms_norm(dtype, t, d):
    x, w = rand(t, d, dtype=dtype), rand(d, dtype=dtype, seed=1)
    out, res = rms_norm(x, w, 1e-6)
    expected, _ = ref.rms_norm(x, w, 1e-6)
    assert res is None and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fused_residual(dtype):
    x, w, r = rand(7, 40, dtype=dtype), rand(40, dtype=dtype, seed=1), rand(7, 40, dtype=dtype, seed=2)
    r_before = r.clone()
    out, new_res = rms_norm(x, w, 1e-5, r)
    expected, expected_res = ref.rms_norm(x, w, 1e-5, r)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    torch.testing.assert_close(new_res, expected_res, **TOL[dtype])
    assert torch.equal(r, r_before)  # the input residual is not modified


def test_rms_norm_promotes_like_torch_and_handles_empty():
    x, w = rand(4, 32, dtype=torch.bfloat16), rand(32)
    out, _ = rms_norm(x, w, 1e-6)
    expected, _ = ref.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOL[torch.bfloat16])
    empty, _ = rms_norm(x[:0], w, 1e-6)
    assert empty.shape == (0, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_dtype", [torch.float32, "x"])
def test_rms_norm_fp32_product_rounds_once_like_the_reference(dtype, w_dtype):
    # Gemma's float32 (1 + w) and OLMo 2's 16-bit weight: the float32
    # product rounded once to x.dtype, bit for bit as the reference rounds it
    x, r = rand(5, 48, dtype=dtype), rand(5, 48, dtype=dtype, seed=2)
    w = 1.0 + 0.2 * rand(48, seed=1).to(dtype if w_dtype == "x" else w_dtype)
    out, res = rms_norm(x, w, 1e-6, r, fp32_product=True)
    expected, expected_res = ref.rms_norm(x, w, 1e-6, r, fp32_product=True)
    assert out.dtype == dtype
    assert torch.equal(res, expected_res)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # it is a different rounding from the default order's (normed row rounded first)
    default, _ = ref.rms_norm(x, w.to(dtype), 1e-6, r)
    assert not torch.equal(default, expected)


def test_rms_norm_fp32_product_is_the_default_in_float32():
    x, w = rand(5, 48), rand(48, seed=1)
    assert torch.equal(ref.rms_norm(x, w, 1e-6, fp32_product=True)[0], ref.rms_norm(x, w, 1e-6)[0])
    torch.testing.assert_close(rms_norm(x, w, 1e-6, fp32_product=True)[0], ref.rms_norm(x, w, 1e-6)[0],
                               **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_rms_norm_and_rotary_round_as_the_reference_bit_for_bit(dtype):
    # the kernels round every intermediate to nearest even as torch does
    x, w, r = rand(7, 40, dtype=dtype), rand(40, dtype=dtype, seed=1), rand(7, 40, dtype=dtype, seed=2)
    out, res = rms_norm(x, w, 1e-5, r)
    expected, expected_res = ref.rms_norm(x, w, 1e-5, r)
    assert torch.equal(res, expected_res) and torch.equal(out, expected)
    positions, cache = torch.tensor([0, 9, 3, 31, 1, 17]), rand(32, 32, seed=3)
    q, k = rand(6, 4, 32, dtype=dtype), rand(6, 2, 32, dtype=dtype, seed=1)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_embedding(positions, q, k, cache)
    ref.rotary_embedding(positions, q_ref, k_ref, cache)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def test_reference_rotary_rounds_like_transformers_in_bf16():
    # transformers: cos/sin cast to q's dtype, then q * cos + rotate_half(q) * sin in that dtype
    positions, cache = torch.tensor([0, 9, 3, 31]), rand(32, 16, seed=3)
    q, k = rand(4, 2, 16, dtype=torch.bfloat16), rand(4, 1, 16, dtype=torch.bfloat16, seed=1)
    cs = cache[positions]
    cos = torch.cat([cs[:, :8], cs[:, :8]], -1)[:, None].to(torch.bfloat16)
    sin = torch.cat([cs[:, 8:], cs[:, 8:]], -1)[:, None].to(torch.bfloat16)
    expected = [t * cos + torch.cat([-t[..., 8:], t[..., :8]], -1) * sin for t in (q, k)]
    ref.rotary_embedding(positions, q, k, cache)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", [(4, 4, 16), (4, 2, 32), (3, 1, 16)])
def test_rotary_embedding_in_place(dtype, hq, hk, d):
    t = 6
    positions = torch.tensor([0, 9, 3, 31, 1, 17])
    cache = rand(32, d, seed=3)
    q, k = rand(t, hq, d, dtype=dtype), rand(t, hk, d, dtype=dtype, seed=1)
    q_ref, k_ref = q.clone(), k.clone()
    q_out, k_out = rotary_embedding(positions, q, k, cache)
    ref.rotary_embedding(positions, q_ref, k_ref, cache)
    assert q_out is q and k_out is k
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])


def test_rotary_embedding_strided_views():
    # q and k as views into one fused qkv activation (token stride 3*H*D)
    t, h, d = 5, 2, 16
    qkv = rand(t, 3, h, d)
    q, k = qkv[:, 0], qkv[:, 1]
    positions = torch.arange(t) * 3
    cache = rand(16, d, seed=3)
    q_ref, k_ref, v_before = q.clone(), k.clone(), qkv[:, 2].clone()
    rotary_embedding(positions, q, k, cache)
    ref.rotary_embedding(positions, q_ref, k_ref, cache)
    torch.testing.assert_close(qkv[:, 0], q_ref, **TOL[torch.float32])
    torch.testing.assert_close(qkv[:, 1], k_ref, **TOL[torch.float32])
    assert torch.equal(qkv[:, 2], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 8), (4, 40), (3, 1100)])
def test_silu_and_mul(dtype, t, inter):
    x = rand(t, 2 * inter, dtype=dtype) * 3
    torch.testing.assert_close(silu_and_mul(x), ref.silu_and_mul(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 8), (4, 40), (3, 1100)])
def test_gelu_tanh_and_mul(dtype, t, inter):
    x = rand(t, 2 * inter, dtype=dtype) * 3
    x[0, :4] = torch.tensor([0.0, 1e-4, 40.0, -40.0])  # near zero and both saturations
    torch.testing.assert_close(gelu_tanh_and_mul(x), ref.gelu_tanh_and_mul(x), **TOL[dtype])


def _slots(block_size):
    # padding, both edges of blocks, and a block reached out of order
    bs = block_size
    return torch.tensor([0, -1, bs - 1, bs, 2 * bs + 1, -1, 5 * bs - 1, 3 * bs])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [3, 4, 16])
def test_store_kv_exact(dtype, block_size):
    nb, hk, d = 6, 2, 16
    slots = _slots(block_size)
    key, value = rand(len(slots), hk, d, dtype=dtype), rand(len(slots), hk, d, dtype=dtype, seed=1)
    k_cache, v_cache = rand(nb, block_size, hk, d, dtype=dtype, seed=2), rand(nb, block_size, hk, d, dtype=dtype, seed=3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots)
    ref.store_kv(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_store_kv_strided_input_and_cast():
    # key/value as views of a fused [T, 2, Hk, D] float32 tensor into an fp16 cache
    kv = rand(5, 2, 2, 16) * 10
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.tensor([7, 0, -1, 8, 3], dtype=torch.int32)
    k_cache = torch.zeros(3, 4, 2, 16, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots)
    ref.store_kv(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def _store_fp8_expected(key, value, k_bytes, v_bytes, slots, k_scale, v_scale):
    # splitserve.kernels.reference.store_kv's math on byte views: torch's CPU index_copy_
    # has no float8 implementation, so the reference itself cannot run here.
    keep = slots >= 0
    for x, cache, s in ((key, k_bytes, k_scale), (value, v_bytes, v_scale)):
        flat = cache.view(-1, *cache.shape[2:])
        flat[slots[keep].long()] = (x[keep].float() / s).to(FP8).view(torch.uint8)


@pytest.mark.parametrize("src_dtype", DTYPES)
def test_store_kv_fp8_quantizes_exactly(src_dtype):
    nb, bs, hk, d = 6, 4, 2, 32
    slots = _slots(bs)
    key = (rand(len(slots), hk, d) * 5).to(src_dtype)
    value = (rand(len(slots), hk, d, seed=1) * 0.01).to(src_dtype)  # exercises subnormals
    k_scale, v_scale = compute_kv_scale(key), 0.37
    key[0, 0, 0] = 1000 * k_scale  # past e4m3's range: must saturate to 448
    k_cache = torch.zeros(nb, bs, hk, d, dtype=FP8)
    v_cache = torch.zeros_like(k_cache)
    k_bytes, v_bytes = torch.zeros(nb, bs, hk, d, dtype=torch.uint8), torch.zeros(nb, bs, hk, d, dtype=torch.uint8)
    store_kv(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    _store_fp8_expected(key, value, k_bytes, v_bytes, slots, k_scale, v_scale)
    assert torch.equal(k_cache.view(torch.uint8), k_bytes)
    assert torch.equal(v_cache.view(torch.uint8), v_bytes)
    assert k_cache.view(-1, hk, d)[0, 0, 0].float() == 448.0


def test_fp8_helpers_bound_the_round_trip():
    x = torch.cat([rand(4000) * 3, rand(1000, seed=1) * 1e-3, torch.tensor([0.0, -7.5])])
    scale = compute_kv_scale(x)
    assert scale == pytest.approx(float(x.abs().max()) / 448.0)
    back = dequantize_kv(quantize_kv(x, scale), scale)
    err = (back - x).abs()
    # 1e-6 relative slack covers the fp32 rounding of x / scale and x8 * scale
    assert bool((err <= kv_quantization_error_bound(x, scale) * (1 + 1e-6) + 1e-12).all())
    # the bound is tight: some element sits within 10% of it
    assert bool((err >= 0.9 * kv_quantization_error_bound(x, scale)).any())
    assert compute_kv_scale(torch.zeros(3)) == 1.0
    with pytest.raises(ValueError, match="inf or NaN"):
        compute_kv_scale(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8])
@pytest.mark.parametrize("layers", [(0, 4, 2), (1, 3, 2), (3, 4, 1)])  # (first, end, planes)
def test_pack_unpack_round_trip_exact(dtype, layers):
    # planes 1: a latent cache (multi-head latent attention), one KV head of width 40
    num_layers, nb, bs = 4, 9, 4
    lo, hi, planes = layers
    hk, d = (2, 16) if planes == 2 else (1, 40)
    kv = rand(num_layers, planes, nb, bs, hk, d).to(dtype)
    ids = torch.tensor([7, 0, 3, 8])
    buf = pack_kv(kv, ids, lo, hi)
    expected = ref.pack_kv(kv.view(torch.uint8) if dtype == FP8 else kv, ids, lo, hi)
    assert buf.shape == (hi - lo, planes, len(ids), bs, hk, d) and buf.dtype == dtype
    assert torch.equal(buf.view(torch.uint8) if dtype == FP8 else buf, expected)

    # scatter into other blocks of a second cache; the reference runs on byte
    # views for fp8 (no CPU index_copy_ for float8)
    target, target_ref = torch.zeros_like(kv), torch.zeros_like(kv)
    new_ids = torch.tensor([1, 2, 6, 5], dtype=torch.int32)
    unpack_kv(buf, target, new_ids, lo)
    if dtype == FP8:
        ref.unpack_kv(buf.view(torch.uint8), target_ref.view(torch.uint8), new_ids, lo)
    else:
        ref.unpack_kv(buf, target_ref, new_ids, lo)
    assert torch.equal(target.view(torch.uint8), target_ref.view(torch.uint8))


def test_pack_unpack_edges():
    kv = rand(2, 2, 5, 4, 1, 16, dtype=torch.bfloat16)
    empty = pack_kv(kv, torch.tensor([], dtype=torch.int64), 0, 2)
    assert empty.shape == (2, 2, 0, 4, 1, 16)
    unpack_kv(empty, kv, torch.tensor([], dtype=torch.int64), 0)  # no-op, no launch
    # a float32 buffer into a bf16 cache converts like the reference
    buf = rand(1, 2, 2, 4, 1, 16, seed=4)
    target, target_ref = kv.clone(), kv.clone()
    unpack_kv(buf, target, torch.tensor([4, 0]), 1)
    ref.unpack_kv(buf, target_ref, torch.tensor([4, 0]), 1)
    assert torch.equal(target, target_ref)
    with pytest.raises(ValueError, match="block ids must lie in"):
        pack_kv(kv, torch.tensor([5]), 0, 1)
    with pytest.raises(ValueError, match="layer range"):
        pack_kv(kv, torch.tensor([0]), 1, 3)
    with pytest.raises(ValueError, match="exceed the cache"):
        unpack_kv(buf, kv, torch.tensor([4, 0]), 2)


def test_launchers_reject_bad_arguments():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(rand(2, 16), rand(8), 1e-6)
    with pytest.raises(ValueError, match="cos_sin_cache width"):
        rotary_embedding(torch.arange(2), rand(2, 2, 16), rand(2, 1, 16), rand(8, 8))
    with pytest.raises(ValueError, match="unit stride"):
        silu_and_mul(rand(16, 4).t())
    cache = torch.zeros(2, 4, 1, 16)
    with pytest.raises(ValueError, match="must be \\[T, 1, 16\\]"):
        store_kv(rand(3, 2, 16), rand(3, 2, 16), cache, cache.clone(), torch.arange(3))
    with pytest.raises(ValueError, match="fp8 scales must be positive"):
        c8 = cache.to(FP8)
        store_kv(rand(3, 1, 16), rand(3, 1, 16), c8, c8.clone(), torch.arange(3), 0.0, 1.0)


def test_force_backend_routes_ops_to_triton():
    assert "triton" in dispatch.available_backends()
    cpu = torch.device("cpu")
    import splitserve.kernels.triton_ops as triton_ops

    with dispatch.force_backend("triton"):
        for name in dispatch.OP_NAMES:
            # linear stays on the vendor matmul (cuBLAS on CUDA): no Triton kernel
            want = ref.linear if name == "linear" else triton_ops.OPS[name]
            assert dispatch.get_op(name, cpu) is want, name
        # a context of 0 tokens attends to nothing: zeros on both backends
        q = rand(2, 2, 16)
        cache = rand(3, 4, 1, 16, seed=1)
        tables = torch.tensor([[0], [2]], dtype=torch.int32)
        lens = torch.tensor([0, 3], dtype=torch.int32)
        out = ops.paged_decode_attention(q, cache, cache, tables, lens, 0.25)
        assert torch.equal(out[0], torch.zeros(2, 16))
        torch.testing.assert_close(out, paged_decode_attention(q, cache, cache, tables, lens, 0.25), rtol=0, atol=0)
        x, w = rand(3, 16), rand(16, seed=2)
        assert torch.equal(ops.rms_norm(x, w, 1e-6)[0], rms_norm(x, w, 1e-6)[0])
    assert dispatch.get_op("rms_norm", cpu) is ref.rms_norm  # CPU default is the reference
    assert torch.equal(ops.paged_decode_attention(q, cache, cache, tables, lens, 0.25)[0],
                       torch.zeros(2, 16))
