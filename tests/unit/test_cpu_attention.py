"""The CPU backend's paged attention (short queries batched per length)
against the reference, sequence by sequence: verify-shaped batches, a mix
with long prompt chunks and empty sequences, GQA, sliding windows, fp8
caches."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.kernels import cpu_attention as cpu
from splitserve.kernels import dispatch
from splitserve.kernels import reference as ref

D = 8


def paged(context_lens, bs=4, hk=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    per = [max(1, math.ceil(c / bs)) for c in context_lens]
    nb = sum(per) + 2
    perm = torch.randperm(nb, generator=g)
    tables = torch.zeros(len(per), max(per) + 1, dtype=torch.int32)  # wider than needed
    start = 0
    for b, n in enumerate(per):
        tables[b, :n] = perm[start:start + n].int()
        start += n
    k = torch.randn(nb, bs, hk, D, generator=g).to(dtype)
    v = torch.randn(nb, bs, hk, D, generator=g).to(dtype)
    return k, v, tables


@pytest.mark.parametrize("q_lens, ctxs", [
    ([5], [23]),  # batch 1 verify, k = 4
    ([5, 5, 5], [9, 30, 5]),  # a verify batch; one context shorter than the group's longest
    ([1, 5, 3, 1, 0], [7, 18, 11, 2, 4]),  # drafts cut short, plain decodes, no new tokens
    ([20, 5, 1, 17], [20, 26, 9, 40]),  # long prompt chunks beside verifies
])
@pytest.mark.parametrize("hq, window", [(4, 0), (2, 0), (4, 3)])
def test_matches_the_reference(q_lens, ctxs, hq, window):
    k, v, tables = paged(ctxs)
    q = torch.randn(sum(q_lens), hq, D, generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    args = (k, v, tables, cu, torch.tensor(ctxs, dtype=torch.int32), D**-0.5)
    got = cpu.paged_attention(q, *args, sliding_window=window)
    want = ref.paged_attention(q, *args, sliding_window=window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 3])
def test_softcap_matches_the_reference(window):
    q_lens, ctxs = [1, 5, 3, 20], [7, 18, 11, 20]
    k, v, tables = paged(ctxs)
    q = 3 * torch.randn(sum(q_lens), 4, D, generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    args = (k, v, tables, cu, torch.tensor(ctxs, dtype=torch.int32), D**-0.5)
    got = cpu.paged_attention(q, *args, sliding_window=window, softcap=1.5)
    want = ref.paged_attention(q, *args, sliding_window=window, softcap=1.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - ref.paged_attention(q, *args, sliding_window=window)).abs().max() > 1e-2


def test_fp8_cache_matches_the_reference():
    ctxs, q_lens = [13, 6], [4, 4]
    k, v, tables = paged(ctxs, dtype=torch.float8_e4m3fn)
    q = torch.randn(sum(q_lens), 4, D, generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    args = (k, v, tables, cu, torch.tensor(ctxs, dtype=torch.int32), D**-0.5, 0.5, 0.25)
    torch.testing.assert_close(cpu.paged_attention(q, *args), ref.paged_attention(q, *args),
                               rtol=1e-5, atol=1e-5)


def test_registered_for_cpu_tensors():
    assert dispatch.get_op("paged_attention", torch.device("cpu")) is cpu.paged_attention


@pytest.mark.parametrize("hq", [4, 2])
def test_alibi_matches_the_reference(hq):
    # verifies, plain decodes and a long chunk, GQA and not: each path's bias per query head
    q_lens, ctxs = [1, 5, 3, 1, 20], [7, 18, 11, 30, 20]
    k, v, tables = paged(ctxs)
    q = torch.randn(sum(q_lens), hq, D, generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    args = (k, v, tables, cu, torch.tensor(ctxs, dtype=torch.int32), D**-0.5)
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(hq)])
    got = cpu.paged_attention(q, *args, alibi_slopes=slopes)
    want = ref.paged_attention(q, *args, alibi_slopes=slopes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - ref.paged_attention(q, *args)).abs().max() > 1e-2
