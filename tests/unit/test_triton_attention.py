"""Triton paged attention kernels (decode split-K and varlen prefill) against
``splitserve.kernels.reference``, through Triton's interpreter on CPU.

Caches are filled everywhere (unused slots hold noise, so a masking bug
shows) and block tables map logical blocks to shuffled physical blocks.

Tolerances, stated per query dtype (outputs are compared elementwise):
- float32: 1e-5 relative and absolute (online softmax reorders sums).
- float16: 2e-3 (output rounding on both sides).
- bfloat16: 1.6e-2 relative, 1e-2 absolute: the interpreter truncates
  float32 -> bfloat16 (hardware rounds to nearest), up to one bf16 step
  (2^-7 relative) plus the reference's half step.
- fp8 KV: both sides read the same fp8 cache and scales, so the query
  dtype's tolerance applies (fp8's own error is tested in
  test_triton_elementwise via splitserve.kernels.fp8).
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from splitserve.kernels import reference as ref  # noqa: E402
from splitserve.kernels.fp8 import compute_kv_scale, quantize_kv  # noqa: E402
from splitserve.kernels.triton.decode_attention import CPU_BLOCK_N, plan_splits, paged_decode_attention  # noqa: E402
from splitserve.kernels.triton.prefill_attention import paged_attention  # noqa: E402

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
GQA = [(2, 2), (4, 2), (4, 1)]  # (Hq, Hk): ratios 1, 2, 4
D = 16


def boundary_lens(bs: int) -> list[int]:
    """Context lengths at and around block boundaries, plus odd and long ones."""
    return [1, bs - 1, bs, bs + 1, 2 * bs, 37, 70]


class PagedCache:
    """Random K/V in shuffled physical blocks for sequences of given lengths."""

    def __init__(self, context_lens, block_size, hk, kv_dtype, seed=0, fp8_scale_from=None):
        g = torch.Generator().manual_seed(seed)
        bs = block_size
        per_seq = [max(1, math.ceil(c / bs)) for c in context_lens]
        num_blocks = sum(per_seq) + 3  # spare blocks never referenced
        width = max(per_seq)
        phys = torch.randperm(num_blocks, generator=g)
        # entries past a sequence's blocks point at arbitrary valid blocks
        self.block_tables = torch.randint(0, num_blocks, (len(context_lens), width), generator=g, dtype=torch.int32)
        start = 0
        for b, n in enumerate(per_seq):
            self.block_tables[b, :n] = phys[start:start + n].int()
            start += n
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32)
        k = torch.randn(num_blocks, bs, hk, D, generator=g)
        v = torch.randn(num_blocks, bs, hk, D, generator=g)
        if kv_dtype == torch.float8_e4m3fn:
            self.k_scale, self.v_scale = compute_kv_scale(k), compute_kv_scale(v)
            self.k, self.v = quantize_kv(k, self.k_scale), quantize_kv(v, self.v_scale)
        else:
            self.k_scale = self.v_scale = 1.0
            self.k, self.v = k.to(kv_dtype), v.to(kv_dtype)


def rand_q(t, hq, dtype, seed=1):
    return torch.randn(t, hq, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_decode(fn, q, c: PagedCache, **kw):
    return fn(q, c.k, c.v, c.block_tables, c.context_lens, D**-0.5, c.k_scale, c.v_scale, **kw)


# -- decode -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("hq,hk", GQA)
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_matches_reference(dtype, hq, hk, block_size):
    cache = PagedCache(boundary_lens(block_size), block_size, hk, dtype)
    q = rand_q(len(cache.context_lens), hq, dtype)
    out = run_decode(paged_decode_attention, q, cache)
    torch.testing.assert_close(out, run_decode(ref.paged_decode_attention, q, cache), **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 100])
def test_decode_split_k(num_splits):
    # contexts of up to 70 tokens span 5 tiles of CPU_BLOCK_N = 16 tokens
    cache = PagedCache([70, 64, 65, 1, 33], 8, 2, torch.float32, seed=3)
    q = rand_q(5, 4, torch.float32)
    out = run_decode(paged_decode_attention, q, cache, num_splits=num_splits)
    torch.testing.assert_close(out, run_decode(ref.paged_decode_attention, q, cache), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_fp8_cache(dtype, num_splits):
    cache = PagedCache(boundary_lens(16), 16, 2, torch.float8_e4m3fn, seed=4)
    q = rand_q(7, 4, dtype)
    out = run_decode(paged_decode_attention, q, cache, num_splits=num_splits)
    torch.testing.assert_close(out, run_decode(ref.paged_decode_attention, q, cache), **TOL[dtype])


def test_decode_odd_block_size_int64_metadata_and_strided_q():
    cache = PagedCache(boundary_lens(5), 5, 1, torch.float32, seed=5)
    cache.block_tables = cache.block_tables.long()
    cache.context_lens = cache.context_lens.long()
    q = rand_q(7, 6, torch.float32)[:, ::2]  # every other head: head stride 2*D
    out = run_decode(paged_decode_attention, q, cache)
    torch.testing.assert_close(out, run_decode(ref.paged_decode_attention, q, cache), **TOL[torch.float32])


def test_decode_empty_batch_and_errors():
    cache = PagedCache([3], 4, 1, torch.float32)
    out = paged_decode_attention(rand_q(0, 2, torch.float32), cache.k, cache.v,
                                 cache.block_tables[:0], cache.context_lens[:0], 0.25)
    assert out.shape == (0, 2, D)
    with pytest.raises(ValueError, match="multiple of num kv heads"):
        run_decode(paged_decode_attention, rand_q(1, 3, torch.float32), PagedCache([3], 4, 2, torch.float32))
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.zeros(1, 1, 32), cache.k, cache.v, cache.block_tables, cache.context_lens, 0.1)
    with pytest.raises(ValueError, match="num_splits"):
        run_decode(paged_decode_attention, rand_q(1, 1, torch.float32), cache, num_splits=0)


def test_plan_splits():
    # Llama-3-8B decode on a 132-SM GPU with 64-token tiles
    assert plan_splits(1, 8, 32768, 64, 132) == (64, 512)  # wants 66 splits: 8 tiles each
    assert plan_splits(64, 8, 2048, 64, 132) == (1, 2048)  # 512 programs already fill the GPU
    assert plan_splits(4, 8, 2048, 64, 132) == (8, 256)  # capped at MIN_TILES_PER_SPLIT tiles each
    assert plan_splits(1, 1, 70, CPU_BLOCK_N, 4, num_splits=3) == (3, 32)
    assert plan_splits(1, 1, 70, CPU_BLOCK_N, 4, num_splits=100) == (5, 16)  # one tile per split at most
    assert plan_splits(2, 2, 0, 16, 4) == (1, 16)


# -- prefill / chunked prefill ------------------------------------------------


def run_prefill(fn, q, c: PagedCache, q_lens):
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return fn(q, c.k, c.v, c.block_tables, cu, c.context_lens, D**-0.5, c.k_scale, c.v_scale)


def check_prefill(q_lens, context_lens, block_size, hq, hk, dtype, kv_dtype=None, seed=0):
    cache = PagedCache(context_lens, block_size, hk, kv_dtype or dtype, seed=seed)
    q = rand_q(sum(q_lens), hq, dtype, seed=seed + 1)
    out = run_prefill(paged_attention, q, cache, q_lens)
    torch.testing.assert_close(out, run_prefill(ref.paged_attention, q, cache, q_lens), **TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("hq,hk", GQA)
@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_whole_prompts(dtype, hq, hk, block_size):
    # empty (q_len 0) and single-token sequences, block boundaries, odd lengths
    bs = block_size
    q_lens = [5, 0, 1, bs - 1, bs, bs + 1, 23]
    context_lens = [max(n, 1) for n in q_lens]  # the empty sequence has 1 cached token
    check_prefill(q_lens, context_lens, bs, hq, hk, dtype)


@pytest.mark.parametrize("hq,hk", GQA)
@pytest.mark.parametrize("block_size", [4, 8])
def test_prefill_chunk_after_cached_prefix(hq, hk, block_size):
    bs = block_size
    # (cached prefix, new tokens): prefixes at k*bs and k*bs +- 1, chunks
    # crossing block edges, a one-token chunk (decode through this kernel)
    pairs = [(2 * bs, 7), (2 * bs - 1, bs), (2 * bs + 1, 1), (bs, 2 * bs + 3), (37, 9), (60, 10)]
    q_lens = [n for _, n in pairs]
    check_prefill(q_lens, [p + n for p, n in pairs], bs, hq, hk, torch.float32, seed=2)


def test_prefill_bf16_prefix_and_g3():
    # a non-power-of-two GQA group (3 query heads per kv head)
    check_prefill([9, 1, 17], [30, 16, 17], 8, 3, 1, torch.bfloat16, seed=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_fp8_cache(dtype):
    check_prefill([6, 1, 17, 0], [21, 33, 17, 4], 16, 4, 2, dtype, kv_dtype=torch.float8_e4m3fn, seed=7)


def test_prefill_strided_q_and_int64_metadata():
    q_lens, context_lens = [3, 8], [11, 8]
    cache = PagedCache(context_lens, 4, 2, torch.float32, seed=8)
    cache.block_tables, cache.context_lens = cache.block_tables.long(), cache.context_lens.long()
    qkv = rand_q(sum(q_lens), 8, torch.float32, seed=9)
    q = qkv[:, :4]  # token stride 8*D: a view of a fused activation
    cu = torch.tensor([0, 3, 11], dtype=torch.int64)
    args = (cache.k, cache.v, cache.block_tables, cu, cache.context_lens, 0.3)
    torch.testing.assert_close(paged_attention(q, *args), ref.paged_attention(q, *args), **TOL[torch.float32])


def test_prefill_empty_and_errors():
    cache = PagedCache([4], 4, 1, torch.float32)
    cu = torch.tensor([0, 0], dtype=torch.int32)
    out = paged_attention(rand_q(0, 1, torch.float32), cache.k, cache.v, cache.block_tables, cu,
                          cache.context_lens, 0.25)
    assert out.shape == (0, 1, D)
    with pytest.raises(ValueError, match="num_seqs \\+ 1"):
        paged_attention(rand_q(2, 1, torch.float32), cache.k, cache.v, cache.block_tables,
                        torch.tensor([0, 1, 2], dtype=torch.int32), cache.context_lens, 0.25)
    v_strided = torch.zeros(*cache.k.shape[:-1], 2 * D)[..., :D]  # same shape, other strides
    with pytest.raises(ValueError, match="strides"):
        paged_attention(rand_q(2, 1, torch.float32), cache.k, v_strided, cache.block_tables,
                        torch.tensor([0, 2], dtype=torch.int32), cache.context_lens, 0.25)


# -- sliding window -------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_sliding_window(window, num_splits):
    cache = PagedCache([70, 64, 65, 1, 33, 16], 8, 2, torch.float32, seed=10)
    q = rand_q(6, 4, torch.float32)
    out = run_decode(paged_decode_attention, q, cache, sliding_window=window, num_splits=num_splits)
    want = run_decode(ref.paged_decode_attention, q, cache, sliding_window=window)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


@pytest.mark.parametrize("window", [1, 3, 8, 20, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_sliding_window(window, dtype):
    # whole prompts and chunks after a cached prefix, crossing the window
    pairs = [(0, 23), (16, 7), (15, 8), (31, 1), (40, 30), (0, 1)]
    q_lens, context_lens = [n for _, n in pairs], [p + n for p, n in pairs]
    cache = PagedCache(context_lens, 8, 2, dtype, seed=11)
    q = rand_q(sum(q_lens), 4, dtype, seed=12)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    args = (cache.k, cache.v, cache.block_tables, cu, cache.context_lens, D**-0.5, 1.0, 1.0, window)
    torch.testing.assert_close(paged_attention(q, *args), ref.paged_attention(q, *args), **TOL[dtype])


# -- attention logit soft-capping (Gemma 2) ----------------------------------------------


@pytest.mark.parametrize("softcap", [0.5, 3.0])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_softcap(softcap, window, num_splits):
    cache = PagedCache([70, 64, 1, 33], 8, 2, torch.float32, seed=13)
    q = rand_q(4, 4, torch.float32) * 4  # large scores, so the cap bends them
    out = run_decode(paged_decode_attention, q, cache, sliding_window=window, softcap=softcap,
                     num_splits=num_splits)
    want = run_decode(ref.paged_decode_attention, q, cache, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    uncapped = run_decode(ref.paged_decode_attention, q, cache, sliding_window=window)
    assert (want - uncapped).abs().max() > 1e-2  # the cap changed the result


@pytest.mark.parametrize("softcap", [0.5, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_softcap(softcap, dtype):
    pairs = [(0, 23), (16, 7), (31, 1), (0, 1)]
    q_lens, context_lens = [n for _, n in pairs], [p + n for p, n in pairs]
    cache = PagedCache(context_lens, 8, 2, dtype, seed=14)
    q = (rand_q(sum(q_lens), 4, torch.float32, seed=15) * 4).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    for window in (0, 8):
        args = (cache.k, cache.v, cache.block_tables, cu, cache.context_lens, D**-0.5, 1.0, 1.0, window,
                softcap)
        want = ref.paged_attention(q, *args)
        torch.testing.assert_close(paged_attention(q, *args), want, **TOL[dtype])
        assert (want.float() - ref.paged_attention(q, *args[:-1]).float()).abs().max() > 1e-2


def test_reference_softcap_matches_eager_math():
    # the reference against the formula written out: softmax(cap * tanh(q.k * s / cap)) v
    cache = PagedCache([9], 4, 1, torch.float32, seed=16)
    q = rand_q(9, 2, torch.float32) * 3
    cu = torch.tensor([0, 9], dtype=torch.int32)
    got = ref.paged_attention(q, cache.k, cache.v, cache.block_tables, cu, cache.context_lens, 0.3,
                              softcap=2.0)
    k = ref._gather_seq_kv(cache.k, cache.block_tables[0], 9, 1.0, torch.float32)  # [9, 1, D]
    v = ref._gather_seq_kv(cache.v, cache.block_tables[0], 9, 1.0, torch.float32)
    scores = torch.einsum("thd,sd->hts", q, k[:, 0]) * 0.3
    scores = 2.0 * torch.tanh(scores / 2.0)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("hts,sd->thd", scores.softmax(-1), v[:, 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- ALiBi (Bloom, MPT, Falcon alibi) ----------------------------------------------


def steep_slopes(hq: int) -> torch.Tensor:
    # 1/2, 1/4, ...: over these contexts the bias outweighs q.k, so a wrong one shows
    return torch.tensor([2.0 ** -(h + 1) for h in range(hq)], dtype=torch.float32)


@pytest.mark.parametrize("hq,hk,num_splits", [(4, 2, None), (3, 1, 3)])
def test_decode_alibi(hq, hk, num_splits):
    cache = PagedCache([70, 64, 1, 33], 8, hk, torch.float32, seed=17)
    q = rand_q(4, hq, torch.float32)
    slopes = steep_slopes(hq)
    out = run_decode(paged_decode_attention, q, cache, alibi_slopes=slopes, num_splits=num_splits)
    want = run_decode(ref.paged_decode_attention, q, cache, alibi_slopes=slopes)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    assert (want - run_decode(ref.paged_decode_attention, q, cache)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_alibi(dtype):
    # whole prompts, chunks after a cached prefix (prefix hits), one-token chunks; GQA
    pairs = [(0, 23), (16, 7), (31, 1), (0, 1), (40, 30)]
    q_lens, context_lens = [n for _, n in pairs], [p + n for p, n in pairs]
    cache = PagedCache(context_lens, 8, 2, dtype, seed=18)
    q = rand_q(sum(q_lens), 4, dtype, seed=19)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    args = (cache.k, cache.v, cache.block_tables, cu, cache.context_lens, D**-0.5)
    slopes = steep_slopes(4)
    want = ref.paged_attention(q, *args, alibi_slopes=slopes)
    torch.testing.assert_close(paged_attention(q, *args, alibi_slopes=slopes), want, **TOL[dtype])
    assert (want.float() - ref.paged_attention(q, *args).float()).abs().max() > 1e-2


def test_alibi_slopes_checked():
    cache = PagedCache([4], 4, 1, torch.float32)
    args = (rand_q(1, 2, torch.float32), cache.k, cache.v, cache.block_tables, cache.context_lens, 0.25)
    with pytest.raises(ValueError, match="alibi_slopes must be float32 \\[2\\]"):
        paged_decode_attention(*args, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="alibi_slopes must be float32"):
        paged_decode_attention(*args, alibi_slopes=torch.ones(2, dtype=torch.float64))


def test_reference_alibi_matches_eager_math():
    # the reference against the formula written out: softmax(q.k * s + slope * (j - i)) v, i
    # the query's position: a 5-token chunk after 4 cached tokens, one KV head for two query heads
    cache = PagedCache([9], 4, 1, torch.float32, seed=20)
    q = rand_q(5, 2, torch.float32)
    slopes = torch.tensor([0.5, 0.125])
    got = ref.paged_attention(q, cache.k, cache.v, cache.block_tables, torch.tensor([0, 5], dtype=torch.int32),
                              cache.context_lens, 0.3, alibi_slopes=slopes)
    k = ref._gather_seq_kv(cache.k, cache.block_tables[0], 9, 1.0, torch.float32)[:, 0]  # [9, D]
    v = ref._gather_seq_kv(cache.v, cache.block_tables[0], 9, 1.0, torch.float32)[:, 0]
    i, j = torch.arange(4, 9)[:, None], torch.arange(9)[None, :]
    scores = torch.einsum("thd,sd->hts", q, k) * 0.3 + slopes[:, None, None] * (j - i)
    scores = scores.masked_fill(j > i, float("-inf"))
    want = torch.einsum("hts,sd->thd", scores.softmax(-1), v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- heads wider than 256: a kv head's query heads over several programs ------------------

@pytest.mark.parametrize("d,hq,hk", [(576, 34, 1), (512, 40, 2)])
def test_wide_heads_split_their_query_heads_over_programs(d, hq, hk):
    """MLA's 576-wide latent (one KV head, key and value at once) and Gemma 4's
    512-wide heads: 16 query heads per program (``heads_per_program``), the
    last program of a kv head partly masked (34 = 16 + 16 + 2; 20 = 16 + 4)."""
    from splitserve.kernels.triton._common import heads_per_program

    assert heads_per_program(hq // hk, 1024 if d > 512 else 512) == 16
    g = torch.Generator().manual_seed(11)
    bs, lens = 8, [1, 9, 30]
    blocks = 16  # 4 per sequence in shuffled order, and spares
    latent = torch.randn(blocks, bs, hk, d, generator=g)
    tables = torch.randperm(blocks, generator=g)[:12].view(3, 4).int()
    ctx = torch.tensor(lens, dtype=torch.int32)
    k, v = latent, (latent if hk == 1 else torch.randn(blocks, bs, hk, d, generator=g))
    scale = d ** -0.5
    q = torch.randn(3, hq, d, generator=g)
    for splits in (1, 3):
        torch.testing.assert_close(
            paged_decode_attention(q, k, v, tables, ctx, scale, num_splits=splits),
            ref.paged_decode_attention(q, k, v, tables, ctx, scale), **TOL[torch.float32])
    q_lens = [1, 5, 12]  # chunks after cached prefixes of 0, 4 and 18 tokens
    qp = torch.randn(sum(q_lens), hq, d, generator=g)
    cu = torch.tensor([0, 1, 6, 18], dtype=torch.int32)
    torch.testing.assert_close(paged_attention(qp, k, v, tables, cu, ctx, scale),
                               ref.paged_attention(qp, k, v, tables, cu, ctx, scale),
                               **TOL[torch.float32])
