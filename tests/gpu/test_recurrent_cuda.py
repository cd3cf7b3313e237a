"""The gated delta rule's decode-step kernel on CUDA against its torch
reference at Qwen3-Next's shape (32 value heads, 128 x 128 float32 states),
batch 64 over shuffled slots. Tolerance 1e-4: float32 throughout, sums in
another order."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

pytest.importorskip("triton")

from splitserve.kernels import recurrent  # noqa: E402
from splitserve.kernels.triton.recurrent import gated_delta_step  # noqa: E402


def test_gated_delta_step_on_cuda():
    dev, b, h, dk, dv = torch.device("cuda"), 64, 32, 128, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(b, h, dk, device=dev, generator=g), dim=-1) * dk ** -0.5
    k = torch.nn.functional.normalize(torch.randn(b, h, dk, device=dev, generator=g), dim=-1)
    v = torch.randn(b, h, dv, device=dev, generator=g)
    gate = -torch.rand(b, h, device=dev, generator=g)
    beta = torch.rand(b, h, device=dev, generator=g)
    state = torch.randn(b + 8, h, dk, dv, device=dev, generator=g)
    slots = torch.randperm(b + 8, device=dev, generator=g)[:b]
    want_state = state.clone()
    want = recurrent.gated_delta_step(q, k, v, gate, beta, want_state, slots)
    got = gated_delta_step(q, k, v, gate, beta, state, slots)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, want_state, rtol=1e-4, atol=1e-4)


def test_ssm_scan_step_on_cuda():
    """Nemotron-H's shape: 128 heads of 64 x 128 states, batch 64."""
    from splitserve.kernels.triton.recurrent import ssm_scan_step

    dev, b, h, p, n = torch.device("cuda"), 64, 128, 64, 128
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(b, h, p, device=dev, generator=g)
    dt = torch.rand(b, h, device=dev, generator=g) * 0.5
    A, D = -torch.rand(h, device=dev, generator=g) * 4, torch.randn(h, device=dev, generator=g)
    B, C = (torch.randn(b, h, n, device=dev, generator=g) for _ in range(2))
    state = torch.randn(b + 8, h, p, n, device=dev, generator=g)
    slots = torch.randperm(b + 8, device=dev, generator=g)[:b]
    want_state = state.clone()
    want = recurrent.ssm_scan_step(x, dt, A, B, C, D, want_state, slots)
    torch.testing.assert_close(ssm_scan_step(x, dt, A, B, C, D, state, slots), want,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, want_state, rtol=1e-4, atol=1e-4)


def test_selective_scan_step_on_cuda():
    """Jamba's Mamba-1 shape: 8192 channels of 16 state entries, batch 64, float32."""
    from splitserve.kernels.triton.recurrent import selective_scan_step

    dev, b, inner, n = torch.device("cuda"), 64, 8192, 16
    g = torch.Generator(device=dev).manual_seed(2)
    u, dt = torch.randn(b, inner, device=dev, generator=g), torch.rand(b, inner, device=dev, generator=g)
    A = -torch.rand(inner, n, device=dev, generator=g) * 4
    B, C = (torch.randn(b, n, device=dev, generator=g) for _ in range(2))
    state = torch.randn(b + 8, inner, n, device=dev, generator=g)
    slots = torch.randperm(b + 8, device=dev, generator=g)[:b]
    want_state = state.clone()
    want = recurrent.selective_scan_step(u, dt, A, B, C, want_state, slots)
    torch.testing.assert_close(selective_scan_step(u, dt, A, B, C, state, slots), want,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, want_state, rtol=1e-4, atol=1e-4)
