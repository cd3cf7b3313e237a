"""The recurrent layers' decode-step kernels compile for NVIDIA GPUs (sm_90,
sm_80) within shared memory, checked without a GPU
(tests.fixtures.triton_compile): the gated delta rule at Qwen3-Next's shape
(32 value heads of 128 x 128 float32 states per rank at TP 1, 16 at TP 2),
with Kimi Delta Attention's decay per key channel, the Mamba-2 scan at Nemotron-H's (128 heads of 64 x 128) and the Mamba-1
selective scan at Jamba's (8192 channels of 16)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from tests.fixtures.triton_compile import compile_cubin, compile_in_subprocess, needs_ptxas, record_launches  # noqa: E402

# (value heads, arch, a decay per key channel: Kimi Delta Attention)
CASES = [(32, 90, False), (16, 90, False), (32, 80, False), (32, 90, True)]


@needs_ptxas
@pytest.mark.slow
def test_gated_delta_step_compiles():
    compile_in_subprocess(__file__, len(CASES) + 3, timeout=300)


def _main() -> None:  # runs in the subprocess, without the interpreter
    import torch

    import splitserve.kernels.triton.recurrent as gd

    b, dk, dv = 8, 128, 128
    for h, arch, per_key in CASES:
        q, k = torch.randn(b, h, dk), torch.randn(b, h, dk)
        v, beta = torch.randn(b, h, dv), torch.rand(b, h)
        g = torch.randn(b, h, dk) if per_key else torch.randn(b, h)
        state, slots = torch.zeros(b, h, dk, dv), torch.arange(b)
        fn, calls = record_launches(gd, ("_gated_delta_step_kernel",),
                                    lambda: gd.gated_delta_step(q, k, v, g, beta, state, slots)
                                    )["_gated_delta_step_kernel"]
        args, kw = calls[0]
        kw = {**kw, "BLOCK_V": 64}  # what the launcher picks on a GPU
        options = {o: kw.pop(o) for o in ("num_warps", "num_stages") if o in kw}
        label = f"gated_delta_step h={h}{' per-key decay' if per_key else ''}"
        binary = compile_cubin(label, fn, args, kw, arch, options)
        print(f"compiled {label} sm_{arch} shared={binary.metadata.shared}", flush=True)
    h, p, n = 128, 64, 128
    x, dt, A, D = torch.randn(b, h, p), torch.rand(b, h), -torch.rand(h), torch.randn(h)
    B, C, state = torch.randn(b, h, n), torch.randn(b, h, n), torch.zeros(b, h, p, n)
    for arch in (90, 80):
        fn, calls = record_launches(gd, ("_ssm_scan_step_kernel",),
                                    lambda: gd.ssm_scan_step(x, dt, A, B, C, D, state, slots)
                                    )["_ssm_scan_step_kernel"]
        args, kw = calls[0]
        options = {o: kw.pop(o) for o in ("num_warps", "num_stages") if o in kw}
        binary = compile_cubin(f"ssm_scan_step h={h}", fn, args, kw, arch, options)
        print(f"compiled ssm_scan_step h={h} sm_{arch} shared={binary.metadata.shared}", flush=True)
    inner, n = 8192, 16  # Jamba's and Falcon Mamba's Mamba-1 layers
    u, dt, A = torch.randn(b, inner), torch.rand(b, inner), -torch.rand(inner, n)
    B, C, state = torch.randn(b, n), torch.randn(b, n), torch.zeros(b, inner, n)
    fn, calls = record_launches(gd, ("_selective_scan_step_kernel",),
                                lambda: gd.selective_scan_step(u, dt, A, B, C, state, slots)
                                )["_selective_scan_step_kernel"]
    args, kw = calls[0]
    options = {o: kw.pop(o) for o in ("num_warps", "num_stages") if o in kw}
    binary = compile_cubin("selective_scan_step", fn, args, kw, 90, options)
    print(f"compiled selective_scan_step inner={inner} sm_90 shared={binary.metadata.shared}", flush=True)


if __name__ == "__main__":
    _main()
