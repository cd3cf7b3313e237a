"""Attention sinks (gpt-oss): a per-head logit joining the softmax's
denominator, in every paged attention backend.

The torch reference against transformers' eager formula written out; the
CPU backend's batched short queries and the Triton kernels (decode split-K
and varlen prefill, through the interpreter) against the reference, with and
without sliding windows, GQA, several sequences and chunks after a cached
prefix. Tolerances as tests/unit/test_triton_attention.py states them.
"""

import pytest
import torch

from splitserve.kernels import cpu_attention
from splitserve.kernels import reference as ref
from tests.unit.test_triton_attention import D, TOL, PagedCache, rand_q, run_decode

triton = pytest.importorskip("triton")

from splitserve.kernels.triton.decode_attention import paged_decode_attention  # noqa: E402
from splitserve.kernels.triton.prefill_attention import paged_attention  # noqa: E402


def sinks_for(hq: int, seed: int = 30) -> torch.Tensor:
    # wide enough that some heads' sinks outweigh every key, others count for little
    return 3.0 * torch.randn(hq, generator=torch.Generator().manual_seed(seed))


def chunks(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, list[int]]:
    """(cu_query_lens, context lens) of (cached prefix, new tokens) pairs."""
    q_lens = [n for _, n in pairs]
    return torch.tensor([0] + q_lens).cumsum(0).to(torch.int32), [p + n for p, n in pairs]


def test_reference_matches_the_eager_formula():
    # transformers' eager_attention_forward: scores with the sink appended, softmax, sink dropped
    cache = PagedCache([9], 4, 2, torch.float32, seed=31)
    q, sinks = rand_q(9, 4, torch.float32), sinks_for(4)
    cu = torch.tensor([0, 9], dtype=torch.int32)
    for window in (0, 3):
        got = ref.paged_attention(q, cache.k, cache.v, cache.block_tables, cu, cache.context_lens, 0.3,
                                  sliding_window=window, sinks=sinks)
        k = ref._gather_seq_kv(cache.k, cache.block_tables[0], 9, 1.0, torch.float32)  # [9, 2, D]
        v = ref._gather_seq_kv(cache.v, cache.block_tables[0], 9, 1.0, torch.float32)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # GQA: 2 heads per KV head
        scores = torch.einsum("thd,shd->hts", q, k) * 0.3
        hidden = torch.ones(9, 9, dtype=torch.bool).triu(1)
        if window:
            hidden |= torch.ones(9, 9, dtype=torch.bool).tril(-window)
        scores = scores.masked_fill(hidden, float("-inf"))
        combined = torch.cat([scores, sinks.view(4, 1, 1).expand(4, 9, 1)], dim=-1)
        probs = combined.softmax(-1)[..., :-1]
        want = torch.einsum("hts,shd->thd", probs, v)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        plain = ref.paged_attention(q, cache.k, cache.v, cache.block_tables, cu, cache.context_lens, 0.3,
                                    sliding_window=window)
        assert (got - plain).abs().max() > 1e-1  # the sinks took a share of the weight


@pytest.mark.parametrize("hq,hk", [(4, 2), (4, 1)])
def test_cpu_short_queries_and_decode_rows_match_the_reference(hq, hk):
    # a verify-like step: 1- and 3-token sequences batched, a long chunk alone
    pairs = [(12, 3), (0, 3), (30, 1), (5, 1), (0, 20)]
    cu, lens = chunks(pairs)
    cache = PagedCache(lens, 4, hk, torch.float32, seed=32)
    q, sinks = rand_q(int(cu[-1]), hq, torch.float32, seed=33), sinks_for(hq)
    for window in (0, 5):
        args = (cache.k, cache.v, cache.block_tables, cu, cache.context_lens, D**-0.5, 1.0, 1.0, window)
        want = torch.cat([ref.paged_attention(q[s:e], cache.k, cache.v, cache.block_tables[b:b + 1],
                                              torch.tensor([0, e - s], dtype=torch.int32),
                                              cache.context_lens[b:b + 1], D**-0.5, sliding_window=window,
                                              sinks=sinks)
                          for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))])
        torch.testing.assert_close(cpu_attention.paged_attention(q, *args, sinks=sinks), want,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref.paged_attention(q, *args, sinks=sinks), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hk,window,num_splits", [(4, 2, 0, None), (4, 1, 0, 3), (4, 2, 5, 3),
                                                     (4, 1, 5, None)])
def test_triton_decode_with_sinks(hq, hk, window, num_splits):
    cache = PagedCache([70, 64, 1, 33, 5], 8, hk, torch.float32, seed=34)
    q, sinks = rand_q(5, hq, torch.float32), sinks_for(hq)
    out = run_decode(paged_decode_attention, q, cache, sliding_window=window, num_splits=num_splits,
                     sinks=sinks)
    want = run_decode(ref.paged_decode_attention, q, cache, sliding_window=window, sinks=sinks)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    plain = run_decode(ref.paged_decode_attention, q, cache, sliding_window=window)
    assert (want - plain).abs().max() > 1e-1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_prefill_with_sinks(dtype):
    # whole prompts and chunks after a cached prefix, GQA 2
    cu, lens = chunks([(0, 23), (16, 7), (31, 1), (0, 1)])
    cache = PagedCache(lens, 8, 2, dtype, seed=35)
    q, sinks = rand_q(int(cu[-1]), 4, dtype, seed=36), sinks_for(4)
    for window in (0, 8):
        args = (cache.k, cache.v, cache.block_tables, cu, cache.context_lens, D**-0.5, 1.0, 1.0, window)
        want = ref.paged_attention(q, *args, sinks=sinks)
        torch.testing.assert_close(paged_attention(q, *args, sinks=sinks), want, **TOL[dtype])
        assert (want.float() - ref.paged_attention(q, *args).float()).abs().max() > 1e-1


def test_triton_refuses_sinks_of_the_wrong_shape():
    cache = PagedCache([5], 4, 2, torch.float32, seed=37)
    q = rand_q(1, 4, torch.float32)
    with pytest.raises(ValueError, match=r"sinks must be a float tensor of \[num_heads=4\]"):
        run_decode(paged_decode_attention, q, cache, sinks=torch.zeros(2))
