"""The ``cpu`` kernel backend: same results as the reference, other layout."""

import pytest
import torch

from splitserve.kernels import cpu_ops, dispatch, ops, reference


@pytest.mark.parametrize("rows", [1, 2, 3, 16, 64, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(4096, 256, generator=g).to(dtype)  # tall: a vocabulary projection
    x = torch.randn(rows, 256, generator=g).to(dtype)
    b = torch.randn(4096, generator=g).to(dtype)
    for bias in (None, b):
        got, want = cpu_ops.linear(x, w, bias), reference.linear(x, w, bias)
        assert got.shape == want.shape == (rows, 4096) and got.dtype == dtype
        assert got.is_contiguous()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert torch.equal(got.float().argmax(-1), want.float().argmax(-1))


@pytest.mark.parametrize("rows", [2, 5, 64])
def test_linear_on_a_large_weight_matches_reference(rows):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(2048, 2048, generator=g)  # 4M elements: a 1B model's projection
    x = torch.randn(rows, 2048, generator=g)
    torch.testing.assert_close(cpu_ops.linear(x, w), reference.linear(x, w), rtol=1e-4, atol=1e-4)


def test_linear_runs_the_reference_outside_its_shapes(monkeypatch):
    calls = []
    real = reference.linear
    monkeypatch.setattr(reference, "linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    square = torch.randn(256, 256)  # neither tall nor large
    cpu_ops.linear(torch.randn(8, 256), square)
    tall = torch.randn(4096, 256)
    cpu_ops.linear(torch.randn(cpu_ops.MAX_ROWS + 1, 256), tall)
    large = torch.randn(2048, 2048)
    cpu_ops.linear(torch.randn(1, 2048), large)  # one row of a large weight: no faster
    assert calls == [8, cpu_ops.MAX_ROWS + 1, 1]
    cpu_ops.linear(torch.randn(1, 256), tall)
    cpu_ops.linear(torch.randn(3, 2048), large)
    assert calls == [8, cpu_ops.MAX_ROWS + 1, 1]  # these two took the weight-first form


def test_cpu_tensors_dispatch_to_the_cpu_backend_unless_forced():
    cpu = torch.device("cpu")
    assert dispatch.backend_for(cpu) == "cpu"
    assert dispatch.get_op("linear", cpu) is cpu_ops.linear
    assert dispatch.get_op("rms_norm", cpu) is reference.rms_norm  # left out: the reference
    with dispatch.force_backend("reference"):
        assert dispatch.get_op("linear", cpu) is reference.linear
    x, w = torch.randn(2, 64), torch.randn(1024, 64)
    torch.testing.assert_close(ops.linear(x, w), reference.linear(x, w), rtol=1e-4, atol=1e-4)
