"""The gated delta rule's decode-step kernel (``kernels/triton/recurrent.py``)
against its torch reference (``kernels/recurrent.py``) under Triton's
interpreter: outputs, the slots it updates in place and the slots it must
leave alone; value widths over several programs and not a power of two;
strided inputs; the state's layout checked."""

import pytest
import torch

pytest.importorskip("triton")

from splitserve.kernels import recurrent  # noqa: E402
from splitserve.kernels.triton.recurrent import gated_delta_step  # noqa: E402


def inputs(b, h, dk, dv, slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, h, dk, generator=g), dim=-1) * dk ** -0.5
    k = torch.nn.functional.normalize(torch.randn(b, h, dk, generator=g), dim=-1)
    v = torch.randn(b, h, dv, generator=g)
    gate = -torch.rand(b, h, generator=g) * 2  # log decay, below 0
    beta = torch.rand(b, h, generator=g)
    state = torch.randn(slots, h, dk, dv, generator=g)
    return q, k, v, gate, beta, state


@pytest.mark.parametrize("b,h,dk,dv", [(3, 2, 16, 24), (4, 3, 32, 72), (2, 4, 128, 128)])
def test_decode_step_matches_the_reference_in_place(b, h, dk, dv):
    q, k, v, gate, beta, state = inputs(b, h, dk, dv, slots=b + 3)
    slots = torch.randperm(b + 3, generator=torch.Generator().manual_seed(1))[:b]
    want_state = state.clone()
    want = recurrent.gated_delta_step(q, k, v, gate, beta, want_state, slots)
    got = gated_delta_step(q, k, v, gate, beta, state, slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)  # others untouched too
    # and a second step from the updated slots
    torch.testing.assert_close(gated_delta_step(q, k, v, gate, beta, state, slots),
                               recurrent.gated_delta_step(q, k, v, gate, beta, want_state, slots),
                               rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_a_layer_view_of_the_store():
    b, h, dk, dv = 3, 2, 16, 40
    q, k, v, gate, beta, _ = inputs(b, h, dk, dv, slots=1, seed=3)
    fused = torch.cat([q, k], dim=-1)  # q and k as views with a row stride of 2 * dk
    store = torch.randn(2, 5, h, dk, dv)  # [layers, slots, ...]: layer 1's view
    want = store.clone()
    slots = torch.tensor([4, 0, 2])
    ref = recurrent.gated_delta_step(q, k, v, gate, beta, want[1], slots)
    got = gated_delta_step(fused[..., :dk], fused[..., dk:], v, gate, beta, store[1], slots)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(store, want, rtol=1e-5, atol=1e-5)
    assert gated_delta_step(q[:0], k[:0], v[:0], gate[:0], beta[:0], store[1], slots[:0]).shape == (0, h, dv)
    with pytest.raises(ValueError, match="float32"):
        gated_delta_step(q, k, v, gate, beta, store[1].double(), slots)
    with pytest.raises(ValueError, match="do not match"):
        gated_delta_step(q, k, v, gate, beta, store[1, :, :1], slots)


@pytest.mark.parametrize("b,h,p,n", [(3, 2, 16, 16), (4, 3, 40, 24), (2, 4, 64, 128)])
def test_ssm_scan_step_matches_the_reference_in_place(b, h, p, n):
    from splitserve.kernels.triton.recurrent import ssm_scan_step

    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, h, p, generator=g)
    dt = torch.rand(b, h, generator=g) * 0.5
    A, D = -torch.rand(h, generator=g) * 4, torch.randn(h, generator=g)
    B, C = torch.randn(b, h, n, generator=g), torch.randn(b, h, n, generator=g)
    state = torch.randn(b + 2, h, p, n, generator=g)
    slots = torch.randperm(b + 2, generator=g)[:b]
    want_state = state.clone()
    for _ in range(2):  # a second step from the updated slots
        want = recurrent.ssm_scan_step(x, dt, A, B, C, D, want_state, slots)
        got = ssm_scan_step(x, dt, A, B, C, D, state, slots)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        ssm_scan_step(x, dt, A, B[..., :-1], C, D, state, slots)


def test_a_decay_per_key_channel():
    """Kimi Delta Attention: g [B, H, Dk] decays each row of the state."""
    b, h, dk, dv = 3, 2, 24, 40
    q, k, v, _, beta, state = inputs(b, h, dk, dv, slots=5, seed=8)
    gate = -torch.rand(b, h, dk, generator=torch.Generator().manual_seed(9)) * 3
    slots = torch.tensor([3, 1, 4])
    want_state = state.clone()
    want = recurrent.gated_delta_step(q, k, v, gate, beta, want_state, slots)
    torch.testing.assert_close(gated_delta_step(q, k, v, gate, beta, state, slots), want,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        gated_delta_step(q, k, v, gate[..., :-1], beta, state, slots)


@pytest.mark.parametrize("b,inner,n", [(3, 40, 16), (2, 96, 24)])
def test_selective_scan_step_matches_the_reference_in_place(b, inner, n):
    from splitserve.kernels.triton.recurrent import selective_scan_step

    g = torch.Generator().manual_seed(7)
    u, dt = torch.randn(b, inner, generator=g), torch.rand(b, inner, generator=g) * 0.5
    A = -torch.rand(inner, n, generator=g) * 4
    B, C = torch.randn(b, n, generator=g), torch.randn(b, n, generator=g)
    state = torch.randn(b + 2, inner, n, generator=g)
    slots = torch.randperm(b + 2, generator=g)[:b]
    want_state = state.clone()
    for _ in range(2):
        want = recurrent.selective_scan_step(u, dt, A, B, C, want_state, slots)
        torch.testing.assert_close(selective_scan_step(u, dt, A, B, C, state, slots), want,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        selective_scan_step(u, dt, A[:, :-1], B, C, state, slots)


def test_without_beta_no_correction():
    """Lightning attention: the decayed sum of k v^T (beta None: u = v)."""
    b, h, dk, dv = 3, 2, 16, 40
    q, k, v, gate, _, state = inputs(b, h, dk, dv, slots=4, seed=12)
    slots = torch.tensor([2, 0, 3])
    want_state = state.clone()
    want = recurrent.gated_delta_step(q, k, v, gate, None, want_state, slots)
    decayed = state[slots] * gate.exp()[..., None, None] + k[..., :, None] * v[..., None, :]
    torch.testing.assert_close(want_state[slots], decayed)
    torch.testing.assert_close(gated_delta_step(q, k, v, gate, None, state, slots), want,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
