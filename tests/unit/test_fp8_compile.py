"""The fp8-weight kernels compile to cubins for NVIDIA targets, checked without a GPU.

As in test_moe_compile.py: each launcher runs on CPU tensors with its
kernels replaced by recorders; the recorded arguments, with the tile sizes
the launcher picks on a GPU, go through ``triton.compile`` down to cubin
with the ptxas that ships with Triton, in a subprocess without
TRITON_INTERPRET. The fp8 x fp8 GEMM is compiled for sm_90 (H100/H200, FP8
tensor cores); the weight-only GEMM for sm_90 and sm_80 (A100: no FP8
tensor cores, the reason it exists); the fp8 MoE kernels for sm_90.
"""

from __future__ import annotations

import sys

import pytest

triton = pytest.importorskip("triton")

from tests.fixtures.triton_compile import (compile_cubin, compile_in_subprocess,  # noqa: E402
                                           divisibility, needs_ptxas, record_launches)

# (name, op, arch, tokens, out_features, in_features, (group_n, group_k), x dtype)
LINEAR_CASES = [
    ("w8a8 per-channel decode", "fp8_w8a8_linear", 90, 8, 4096, 4096, (1, 4096), "bfloat16"),
    ("w8a8 block prefill", "fp8_w8a8_linear", 90, 2048, 14336, 4096, (128, 128), "bfloat16"),
    ("w8a16 block sm80", "fp8_w8a16_linear", 80, 64, 4096, 4096, (128, 128), "bfloat16"),
    ("w8a16 per-channel fp16 sm90", "fp8_w8a16_linear", 90, 256, 4096, 4096, (1, 4096), "float16"),
]
# (name, tokens, experts, top_k, hidden, intermediate, (group_n, group_k))
MOE_CASES = [("mixtral fp8 block", 64, 8, 2, 4096, 14336, (128, 128))]
EXPECTED = {
    "linear": ([f"{c[0]} _fp8_gemm_kernel" for c in LINEAR_CASES]
               + [f"{c[0]} _quant_per_token_kernel" for c in LINEAR_CASES if c[1] == "fp8_w8a8_linear"]),
    "moe": [f"{c[0]} {k}" for c in MOE_CASES for k in ("_moe_gate_up_kernel", "_moe_down_kernel")],
}


@needs_ptxas
@pytest.mark.parametrize("family", EXPECTED)
def test_fp8_kernels_compile_for_nvidia_targets(family):
    compiled = compile_in_subprocess([__file__, family], len(EXPECTED[family]), timeout=400)
    assert sorted(line.split(" sm_")[0].removeprefix("compiled ") for line in compiled) \
        == sorted(EXPECTED[family])


def _main(family: str) -> None:  # runs in the subprocess, without the interpreter
    import torch

    import splitserve.kernels.triton.fp8_gemm as gemm
    import splitserve.kernels.triton.fused_moe as moe

    def record(module, names, launch) -> dict:
        """kernel name -> (kernel, args, kwargs) of its first launch by ``launch``."""
        return {n: (fn, *calls[0]) for n, (fn, calls) in
                record_launches(module, (), launch, optional=names).items()}

    def compile_all(name, arch, launches, gpu_kwargs):
        for kernel, (fn, args, kw) in launches.items():
            warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
            kw.update(gpu_kwargs.get(kernel, {}))
            binary = compile_cubin((name, kernel), fn, args, kw, arch,
                                   {"num_warps": warps, "num_stages": stages},
                                   attrs=divisibility(fn, args))
            print(f"compiled {name} {kernel} sm_{arch} shared={binary.metadata.shared}", flush=True)

    for name, op, arch, m, n, k, (gn, gk), dtype in LINEAR_CASES if family == "linear" else ():
        dt = getattr(torch, dtype)
        x = torch.zeros(m, k, dtype=dt)
        w8 = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
        scale = torch.ones(-(-n // gn), -(-k // gk))
        launches = record(gemm, ("_fp8_gemm_kernel", "_quant_per_token_kernel"),
                          lambda: getattr(gemm, op)(x, w8, scale, gn, gk))
        fp8_dot = op == "fp8_w8a8_linear"
        bm, bn, bk, warps, stages = gemm.tile_shape(m, fp8_dot, on_gpu=True)
        gpu = {"_fp8_gemm_kernel": dict(DOT_F32=False, PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn,
                                        BLOCK_K=gemm.block_k_for(gk, k, bk),
                                        num_warps=warps, num_stages=stages),
               "_quant_per_token_kernel": dict(BLOCK_K=min(1024, gemm.next_pow2(k)))}
        for kernel, (_, _, kw) in launches.items():  # options travel apart from constexprs
            kw["num_warps"] = gpu[kernel].pop("num_warps", kw.get("num_warps", 4))
            kw["num_stages"] = gpu[kernel].pop("num_stages", kw.get("num_stages", 3))
        compile_all(name, arch, launches, gpu)

    for name, t, e, top_k, h, i, (gn, gk) in MOE_CASES if family == "moe" else ():
        x = torch.zeros(t, h, dtype=torch.bfloat16)
        w_gate_up = torch.zeros(e, 2 * i, h, dtype=torch.float8_e4m3fn)
        w_down = torch.zeros(e, h, i, dtype=torch.float8_e4m3fn)
        gu_scale = torch.ones(e, -(-2 * i // gn), -(-h // gk))
        d_scale = torch.ones(e, -(-h // gn), -(-i // gk))
        ids = torch.randint(0, e, (t, top_k))
        weights = torch.rand(t, top_k)
        launches = record(moe, ("_moe_gate_up_kernel", "_moe_down_kernel"), lambda: moe.fp8_fused_moe(
            x, w_gate_up, gu_scale, (gn, gk), w_down, d_scale, (gn, gk), weights, ids))
        bm, bn, bk, warps, stages = moe._tile_shape(t * top_k, e, on_gpu=True)
        common = dict(DOT_F32=False, PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_K=gemm.block_k_for(gk, h, bk))
        for kernel, (_, _, kw) in launches.items():
            kw["num_warps"], kw["num_stages"] = warps, stages
        compile_all(name, 90, launches, {k: common for k in launches})


if __name__ == "__main__":
    _main(sys.argv[1])
