"""Triton kernels on CUDA against ``splitserve.kernels.reference`` at realistic shapes
(Llama-3-8B attention: 32 query heads, 8 kv heads, head_dim 128; block 16).

Tolerances (hardware rounds to nearest, unlike the CPU interpreter):
- float32: 1e-4 (IEEE dots, long reductions in another order).
- float16: 3e-3; bfloat16: 2e-2 relative, 1e-2 absolute (softmax weights
  are rounded to the query dtype before the PV product, as in flash attention).
- Copies and fp8 encoding: exact.
Includes CUDA-graph capture of both attention kernels (their launches must
not sync with the host).
"""

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

triton = pytest.importorskip("triton")

from splitserve.kernels import dispatch, ops  # noqa: E402
from splitserve.kernels import reference as ref  # noqa: E402
from splitserve.kernels.fp8 import compute_kv_scale, quantize_kv  # noqa: E402
from splitserve.kernels.triton import activation, decode_attention, kv_pack, kv_store, prefill_attention, rmsnorm, rope  # noqa: E402

CUDA = torch.device("cuda")
FP8 = torch.float8_e4m3fn
HQ, HK, D, BS = 32, 8, 128, 16
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=3e-3, atol=3e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
}
DTYPES = list(TOL)


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=CUDA).to(dtype)


class PagedCache:
    """Random K/V in shuffled physical blocks for sequences of given lengths."""

    def __init__(self, context_lens, kv_dtype, seed=0, hk=HK):
        g = torch.Generator().manual_seed(seed)
        per_seq = [max(1, math.ceil(c / BS)) for c in context_lens]
        num_blocks = sum(per_seq) + 8
        phys = torch.randperm(num_blocks, generator=g)
        tables = torch.randint(0, num_blocks, (len(context_lens), max(per_seq)), generator=g, dtype=torch.int32)
        start = 0
        for b, n in enumerate(per_seq):
            tables[b, :n] = phys[start:start + n].int()
            start += n
        self.block_tables = tables.to(CUDA)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=CUDA)
        k, v = rand(num_blocks, BS, hk, D, seed=seed), rand(num_blocks, BS, hk, D, seed=seed + 1)
        if kv_dtype == FP8:
            self.k_scale, self.v_scale = compute_kv_scale(k), compute_kv_scale(v)
            self.k, self.v = quantize_kv(k, self.k_scale), quantize_kv(v, self.v_scale)
        else:
            self.k_scale = self.v_scale = 1.0
            self.k, self.v = k.to(kv_dtype), v.to(kv_dtype)


def test_dispatch_picks_triton_on_cuda():
    assert dispatch.backend_for(CUDA) == "triton"
    x, w = rand(4, 256, dtype=torch.bfloat16), rand(256, dtype=torch.bfloat16)
    assert torch.equal(ops.rms_norm(x, w, 1e-6)[0], rmsnorm.rms_norm(x, w, 1e-6)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rope_silu(dtype):
    x, w, r = rand(333, 4096, dtype=dtype), rand(4096, dtype=dtype, seed=1), rand(333, 4096, dtype=dtype, seed=2)
    for got, want in zip(rmsnorm.rms_norm(x, w, 1e-5, r), ref.rms_norm(x, w, 1e-5, r)):
        torch.testing.assert_close(got, want, **TOL[dtype])
    positions = torch.randint(0, 4096, (333,), device=CUDA)
    cache = rand(4096, D, seed=3)
    q, k = rand(333, HQ, D, dtype=dtype), rand(333, HK, D, dtype=dtype, seed=4)
    q_ref, k_ref = q.clone(), k.clone()
    rope.rotary_embedding(positions, q, k, cache)
    ref.rotary_embedding(positions, q_ref, k_ref, cache)
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])
    g = rand(333, 2 * 14336, dtype=dtype, seed=5) * 3
    torch.testing.assert_close(activation.silu_and_mul(g), ref.silu_and_mul(g), **TOL[dtype])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_store_kv_exact(cache_dtype):
    t, nb = 777, 100
    key, value = rand(t, HK, D, dtype=torch.bfloat16), rand(t, HK, D, dtype=torch.bfloat16, seed=1)
    slots = torch.randperm(nb * BS, device=CUDA)[:t]
    slots[::7] = -1
    k_cache = torch.zeros(nb, BS, HK, D, dtype=cache_dtype, device=CUDA)
    v_cache = torch.zeros_like(k_cache)
    ks, vs = (compute_kv_scale(key), compute_kv_scale(value)) if cache_dtype == FP8 else (1.0, 1.0)
    kv_store.store_kv(key, value, k_cache, v_cache, slots, ks, vs)
    keep = slots >= 0
    for x, cache, s in ((key, k_cache, ks), (value, v_cache, vs)):
        expected = torch.zeros_like(cache).view(torch.uint8).view(nb * BS, HK, -1)
        stored = (x[keep].float() / s).to(cache_dtype) if cache_dtype == FP8 else x[keep]
        expected[slots[keep]] = stored.view(torch.uint8)
        assert torch.equal(cache.view(torch.uint8).view(nb * BS, HK, -1), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_pack_unpack_exact(dtype):
    kv = rand(32, 2, 300, BS, HK, D).to(dtype)
    ids = torch.randperm(300, device=CUDA)[:97]
    buf = kv_pack.pack_kv(kv, ids, 4, 20)
    assert torch.equal(buf.view(torch.uint8), ref.pack_kv(kv.view(torch.uint8), ids, 4, 20))
    target, expected = torch.zeros_like(kv), torch.zeros_like(kv)
    new_ids = torch.randperm(300, device=CUDA)[:97]
    kv_pack.unpack_kv(buf.cpu(), target, new_ids, 10)  # a host buffer, as received over the network
    ref.unpack_kv(buf.view(torch.uint8), expected.view(torch.uint8), new_ids, 10)
    assert torch.equal(target.view(torch.uint8), expected.view(torch.uint8))


def _decode(fn, q, c, **kw):
    return fn(q, c.k, c.v, c.block_tables, c.context_lens, D**-0.5, c.k_scale, c.v_scale, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_attention(dtype, num_splits):
    lens = [1, 15, 16, 17, 255, 256, 257, 1000, 2048, 2049, 3001, 64]
    c = PagedCache(lens, dtype)
    q = rand(len(lens), HQ, D, dtype=dtype, seed=9)
    out = _decode(decode_attention.paged_decode_attention, q, c, num_splits=num_splits)
    torch.testing.assert_close(out, _decode(ref.paged_decode_attention, q, c), **TOL[dtype])


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_fp8_long_context(q_dtype):
    c = PagedCache([32768, 5, 9000], FP8, seed=3)
    q = rand(3, HQ, D, dtype=q_dtype, seed=9)
    out = _decode(decode_attention.paged_decode_attention, q, c)
    torch.testing.assert_close(out, _decode(ref.paged_decode_attention, q, c), **TOL[q_dtype])


def _prefill(fn, q, c, q_lens):
    cu = torch.tensor([0] + q_lens, device=CUDA).cumsum(0).to(torch.int32)
    return fn(q, c.k, c.v, c.block_tables, cu, c.context_lens, D**-0.5, c.k_scale, c.v_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_fp8", [False, True])
def test_prefill_attention(dtype, kv_fp8):
    if kv_fp8 and dtype == torch.float32:
        pytest.skip("fp8 KV serves 16-bit models")
    # whole prompts, a chunk after a cached prefix at/around block edges, empty and single-token
    pairs = [(0, 1000), (0, 1), (16, 0), (512, 300), (511, 17), (513, 1), (2047, 129), (0, 16)]
    q_lens = [n for _, n in pairs]
    c = PagedCache([max(1, p + n) for p, n in pairs], FP8 if kv_fp8 else dtype, seed=5)
    q = rand(sum(q_lens), HQ, D, dtype=dtype, seed=6)
    torch.testing.assert_close(_prefill(prefill_attention.paged_attention, q, c, q_lens),
                               _prefill(ref.paged_attention, q, c, q_lens), **TOL[dtype])


@pytest.mark.parametrize("hq,hk", [(32, 32), (28, 4), (64, 8)])
def test_prefill_gqa_ratios(hq, hk):
    q_lens = [77, 300]
    c = PagedCache([100, 300], torch.bfloat16, seed=7, hk=hk)
    q = rand(sum(q_lens), hq, D, dtype=torch.bfloat16, seed=8)
    torch.testing.assert_close(_prefill(prefill_attention.paged_attention, q, c, q_lens),
                               _prefill(ref.paged_attention, q, c, q_lens), **TOL[torch.bfloat16])


def test_attention_in_cuda_graphs():
    c = PagedCache([300, 1200, 17, 4000], torch.bfloat16, seed=11)
    q_dec = rand(4, HQ, D, dtype=torch.bfloat16, seed=12)
    q_lens = [50, 1, 7, 100]
    q_pre = rand(sum(q_lens), HQ, D, dtype=torch.bfloat16, seed=13)
    cu = torch.tensor([0] + q_lens, device=CUDA).cumsum(0).to(torch.int32)
    args = (c.k, c.v, c.block_tables)

    def step():
        return (decode_attention.paged_decode_attention(q_dec, *args, c.context_lens, D**-0.5),
                prefill_attention.paged_attention(q_pre, *args, cu, c.context_lens, D**-0.5))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec_out, pre_out = step()
    # new contexts and queries, same shapes: the replay must read them
    c.context_lens.copy_(torch.tensor([301, 1000, 256, 3999], dtype=torch.int32))
    q_dec.copy_(rand(4, HQ, D, dtype=torch.bfloat16, seed=14))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(dec_out, _decode(ref.paged_decode_attention, q_dec, c), **TOL[torch.bfloat16])
    torch.testing.assert_close(pre_out, _prefill(ref.paged_attention, q_pre, c, q_lens), **TOL[torch.bfloat16])


@pytest.mark.parametrize("d,hq,hk", [(576, 128, 1), (576, 16, 1), (576, 20, 1), (512, 32, 4)])
def test_wide_heads(d, hq, hk):
    """Multi-head latent attention (DeepSeek-V3 at TP 1 and 8, GLM-4.7-Flash: one
    576-wide latent, key and value at once) and Gemma 4's 512-wide heads: the
    kernels launch (16 query heads per program) and match the reference."""
    g = torch.Generator(device=CUDA).manual_seed(21)
    lens, bs = [1, 700, 2049], BS
    per = [math.ceil(n / bs) for n in lens]
    blocks = sum(per) + 4
    tables = torch.zeros(len(lens), max(per), dtype=torch.int32, device=CUDA)
    phys = torch.randperm(blocks, device=CUDA, generator=g).int()
    at = 0
    for i, n in enumerate(per):
        tables[i, :n] = phys[at:at + n]
        at += n
    ctx = torch.tensor(lens, dtype=torch.int32, device=CUDA)
    k = torch.randn(blocks, bs, hk, d, device=CUDA, generator=g).to(torch.bfloat16)
    v = k if hk == 1 else torch.randn(blocks, bs, hk, d, device=CUDA, generator=g).to(torch.bfloat16)
    scale = d ** -0.5
    q = torch.randn(len(lens), hq, d, device=CUDA, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(decode_attention.paged_decode_attention(q, k, v, tables, ctx, scale),
                               ref.paged_decode_attention(q, k, v, tables, ctx, scale),
                               **TOL[torch.bfloat16])
    q_lens = [1, 300, 49]
    cu = torch.tensor([0] + q_lens, device=CUDA).cumsum(0).to(torch.int32)
    qp = torch.randn(sum(q_lens), hq, d, device=CUDA, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(prefill_attention.paged_attention(qp, k, v, tables, cu, ctx, scale),
                               ref.paged_attention(qp, k, v, tables, cu, ctx, scale),
                               **TOL[torch.bfloat16])
