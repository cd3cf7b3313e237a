"""Batched LoRA ops: the torch reference against a per-token oracle, the
Triton kernels (interpreted on CPU) against the reference, the batch
metadata, and dispatch.

Batches mix tokens of several slots and of the base model (slot -1), with
slots no token uses, fused outputs of one to three slices and ranks that
are no multiple of any tile. Tolerances: float32 1e-5; half precision a
few units of the output's last place (both sides round h to the weights'
dtype and the sum once; the interpreter truncates where hardware rounds).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from splitserve.kernels import dispatch, ops  # noqa: E402
from splitserve.kernels import lora as ref  # noqa: E402
from splitserve.kernels.triton import lora as tri  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def problem(t, k, slices, rank, slots, dtype=torch.float32, seed=0, used=None):
    """x, lora_a, lora_b, token slots, slice offsets; ``used`` restricts the
    tokens to those slots (and -1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    offsets = [0]
    for width in slices:
        offsets.append(offsets[-1] + width)
    a = (torch.randn(slots, len(slices) * rank, k, generator=g) * k ** -0.5).to(dtype)
    b = (torch.randn(slots, offsets[-1], rank, generator=g) * rank ** -0.5).to(dtype)
    choices = list(used) if used is not None else list(range(-1, slots))
    token_slots = [choices[int(i)] for i in torch.randint(0, len(choices), (t,), generator=g)]
    return x, a, b, token_slots, offsets


def oracle(x, a, b, token_slots, offsets, y0):
    """Token by token, slice by slice, in float64."""
    rank = b.shape[2]
    out = y0.double().clone()
    for t, s in enumerate(token_slots):
        if s < 0:
            continue
        h = a[s].double() @ x[t].double()
        for i in range(len(offsets) - 1):
            o0, o1 = offsets[i], offsets[i + 1]
            out[t, o0:o1] += b[s, o0:o1].double() @ h[i * rank:(i + 1) * rank]
    return out


def run(mod, x, a, b, token_slots, offsets, y0):
    meta = ref.lora_meta(token_slots, a.shape[0])
    y = y0.clone()
    h = mod.lora_shrink(x, a, meta)
    mod.lora_expand(y, h, b, meta, offsets)
    return y


CASES = [  # (tokens, in, slices, rank, slots)
    (1, 64, (64,), 8, 2),  # one decoding token
    (7, 64, (64, 32, 32), 4, 3),  # q/k/v
    (33, 48, (40, 40), 16, 4),  # gate/up; sizes that are no multiple of a tile
    (40, 96, (48,), 5, 1),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_oracle(case):
    x, a, b, slots, offsets = problem(*case)
    y0 = torch.randn(x.shape[0], offsets[-1])
    got = run(ref, x, a, b, slots, offsets, y0)
    torch.testing.assert_close(got.double(), oracle(x, a, b, slots, offsets, y0), atol=1e-5, rtol=1e-5)
    base = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base], y0[base])  # base-model rows untouched


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_float32(case):
    x, a, b, slots, offsets = problem(*case, seed=1)
    y0 = torch.randn(x.shape[0], offsets[-1])
    torch.testing.assert_close(run(tri, x, a, b, slots, offsets, y0),
                               run(ref, x, a, b, slots, offsets, y0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_half(dtype):
    x, a, b, slots, offsets = problem(20, 64, (32, 16, 16), 8, 3, dtype=dtype, seed=2)
    y0 = torch.randn(x.shape[0], offsets[-1]).to(dtype)
    got = run(tri, x, a, b, slots, offsets, y0)
    want = run(ref, x, a, b, slots, offsets, y0)
    assert got.dtype == dtype
    tol = TOL[dtype] * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


def test_slots_without_tokens_and_long_segments():
    # 4 slots, tokens of slots 1 and 3 only, each with more rows than one block
    x, a, b, slots, offsets = problem(50, 32, (24,), 8, 4, used=(1, 3, -1), seed=3)
    y0 = torch.randn(50, 24)
    want = oracle(x, a, b, slots, offsets, y0)
    torch.testing.assert_close(run(tri, x, a, b, slots, offsets, y0).double(), want, atol=1e-5, rtol=1e-5)


def test_all_base_tokens_change_nothing():
    x, a, b, _, offsets = problem(6, 32, (16,), 4, 2)
    y0 = torch.randn(6, 16)
    for mod in (ref, tri):
        assert torch.equal(run(mod, x, a, b, [-1] * 6, offsets, y0), y0)


def test_meta_groups_tokens_by_slot():
    meta = ref.lora_meta([2, -1, 0, 2, 0, -1, 2], 3)
    assert meta.token_slots.tolist() == [2, -1, 0, 2, 0, -1, 2]
    assert meta.sorted_tokens.tolist() == [2, 4, 0, 3, 6, 1, 5]
    assert meta.seg_start.tolist() == [0, 2, 2] and meta.seg_len.tolist() == [2, 0, 3]
    assert all(t.dtype == torch.int32 for t in meta)
    with pytest.raises(ValueError, match="slot 3"):
        ref.lora_meta([3], 3)


def test_launcher_rejects_mismatched_shapes():
    x, a, b, slots, offsets = problem(4, 32, (16, 8), 4, 2)
    meta = ref.lora_meta(slots, 2)
    with pytest.raises(ValueError, match="does not fit"):
        tri.lora_shrink(x, a[:, :, :16], meta)
    with pytest.raises(ValueError, match="LoraMeta"):
        tri.lora_shrink(x, a, ref.lora_meta(slots[:3], 2))
    h = tri.lora_shrink(x, a, meta)
    with pytest.raises(ValueError, match="slice_offsets"):
        tri.lora_expand(torch.zeros(4, 24), h, b, meta, [0, 16, 20])
    with pytest.raises(ValueError, match="dtype"):
        tri.lora_shrink(x, a.half(), meta)


def test_dispatch():
    x, a, b, slots, offsets = problem(6, 32, (16,), 4, 2)
    cpu = torch.device("cpu")
    assert dispatch.get_op("lora_shrink", cpu) is ref.lora_shrink  # cpu: the reference
    assert dispatch.get_op("lora_expand", cpu) is ref.lora_expand
    y0 = torch.zeros(6, 16)
    with dispatch.force_backend("triton"):
        assert dispatch.get_op("lora_shrink", cpu) is tri.lora_shrink
        meta = ref.lora_meta(slots, 2)
        y = ops.lora_expand(y0.clone(), ops.lora_shrink(x, a, meta), b, meta, offsets)
    torch.testing.assert_close(y, run(ref, x, a, b, slots, offsets, y0), atol=1e-5, rtol=1e-5)
