"""The fused MoE op: the torch reference against a per-token oracle, the
Triton kernel (interpreted on CPU) against the reference, the grouping of
token-expert pairs by expert, and dispatch.

Tolerances against the reference, per dtype: float32 1e-5 (sums in another
order); float16 2e-3 of the output's scale; bfloat16 3e-2 of the output's
scale: the interpreter truncates where hardware rounds when it narrows to
bfloat16, and the kernel narrows four times (gate, silu, product, down
projection) with a bias that a sum over the intermediate size does not
average out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from splitserve.kernels import dispatch, ops  # noqa: E402
from splitserve.kernels import reference as ref  # noqa: E402
from splitserve.kernels.triton.fused_moe import fused_moe, group_by_expert  # noqa: E402

SCALE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}


def problem(t, h, i, e, k, dtype=torch.float32, seed=0, experts=None):
    """x, w_gate_up, w_down, topk_weights, topk_ids; ``experts`` restricts
    routing to those expert ids (the others receive no token)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w_gate_up = (torch.randn(e, 2 * i, h, generator=g) * h**-0.5).to(dtype)
    w_down = (torch.randn(e, h, i, generator=g) * i**-0.5).to(dtype)
    logits = torch.randn(t, e, generator=g)
    if experts is not None:
        allowed = torch.full((e,), float("-inf"))
        allowed[list(experts)] = 0.0
        logits = logits + allowed
    weights, ids = torch.softmax(logits, -1).topk(k, -1)
    return x, w_gate_up, w_down, weights, ids


def oracle(x, w_gate_up, w_down, weights, ids):
    """Token by token, expert by expert, in float64."""
    x, w_gate_up, w_down = x.double(), w_gate_up.double(), w_down.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate, up = (w_gate_up[e] @ x[t]).chunk(2)
            out[t] += w * (w_down[e] @ (F.silu(gate) * up))
    return out


def assert_close_to_scale(got, want, dtype):
    tol = SCALE_TOL[dtype] * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


SHAPES = [  # (tokens, hidden, intermediate, experts, top_k)
    (1, 64, 32, 4, 1),  # one decoding token
    (5, 64, 32, 4, 2),
    (33, 48, 40, 8, 2),  # sizes that are no multiple of any tile
    (40, 64, 96, 8, 1),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_oracle(shape):
    args = problem(*shape)
    torch.testing.assert_close(ref.fused_moe(*args).double(), oracle(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_float32(shape):
    args = problem(*shape)
    got = fused_moe(*args)
    assert got.shape == args[0].shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref.fused_moe(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2])
def test_triton_matches_reference_half(dtype, k):
    args = problem(20, 64, 48, 4, k, dtype=dtype, seed=k)
    got = fused_moe(*args)
    assert got.dtype == dtype
    assert_close_to_scale(got, ref.fused_moe(*args), dtype)


@pytest.mark.parametrize("k", [1, 2])
def test_experts_without_tokens(k):
    # 8 experts, tokens routed to 2 of them: six get nothing, each busy one
    # gets more rows than one block (16 under the interpreter)
    args = problem(24, 32, 32, 8, k, experts=(2, 5), seed=3)
    assert set(args[4].unique().tolist()) <= {2, 5}
    torch.testing.assert_close(fused_moe(*args), ref.fused_moe(*args), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.fused_moe(*args).double(), oracle(*args), atol=1e-5, rtol=1e-5)


def test_no_tokens():
    x, w_gate_up, w_down, weights, ids = problem(0, 32, 16, 4, 2)
    assert fused_moe(x, w_gate_up, w_down, weights, ids).shape == (0, 32)
    assert ref.fused_moe(x, w_gate_up, w_down, weights, ids).shape == (0, 32)


@pytest.mark.parametrize("t, k, e, block_m", [(1, 2, 8, 16), (24, 2, 8, 16), (50, 1, 3, 4), (7, 3, 4, 1)])
def test_group_by_expert(t, k, e, block_m):
    ids = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(s))[:k] for s in range(t)])
    pair_ids, block_expert = group_by_expert(ids, e, block_m)
    p = t * k
    assert block_expert.shape == (p // block_m + min(e, p),)
    assert pair_ids.shape == (block_expert.shape[0] * block_m,)
    real = pair_ids[pair_ids < p]
    assert sorted(real.tolist()) == list(range(p))  # every pair exactly once
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=e)
    for b, expert in enumerate(block_expert.tolist()):
        rows = pair_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < p]
        if expert < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows.long()] == expert).all()
    # blocks in expert order, each expert exactly the blocks its pairs need
    used = block_expert[block_expert >= 0].tolist()
    assert used == sorted(used)
    assert [used.count(x) for x in range(e)] == [-(-int(c) // block_m) for c in counts]


def test_launcher_rejects_mismatched_shapes():
    x, w_gate_up, w_down, weights, ids = problem(4, 32, 16, 4, 2)
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(x, w_gate_up, w_down[:, :, :8], weights, ids)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe(x, w_gate_up, w_down, weights[:3], ids[:3])
    with pytest.raises(ValueError, match="dtype"):
        fused_moe(x, w_gate_up.half(), w_down, weights, ids)


def test_dispatch():
    args = problem(6, 32, 16, 4, 2)
    assert dispatch.get_op("fused_moe", torch.device("cpu")) is ref.fused_moe  # cpu: the reference
    with dispatch.force_backend("triton"):
        assert dispatch.get_op("fused_moe", torch.device("cpu")) is fused_moe
        got = ops.fused_moe(*args)
    torch.testing.assert_close(got, ref.fused_moe(*args), atol=1e-5, rtol=1e-5)
