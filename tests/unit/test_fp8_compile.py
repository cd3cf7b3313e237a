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

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}  # bytes per block, opt-in maximum

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


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas")
@pytest.mark.parametrize("family", EXPECTED)
def test_fp8_kernels_compile_for_nvidia_targets(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__, family], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    compiled = sorted(line.split(" sm_")[0].removeprefix("compiled ")
                      for line in proc.stdout.splitlines() if line.startswith("compiled "))
    assert compiled == sorted(EXPECTED[family]), proc.stdout


def _main(family: str) -> None:  # runs in the subprocess, without the interpreter
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import splitserve.kernels.triton.fp8_gemm as gemm
    import splitserve.kernels.triton.fused_moe as moe

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
             torch.int32: "i32", torch.int64: "i64"}

    def record(module, names, launch) -> dict:
        """kernel name -> (kernel, args, kwargs) of its launch by ``launch``."""
        calls, originals = {}, {n: getattr(module, n) for n in names}

        class Recorder:
            def __init__(self, name):
                self.name = name

            def __getitem__(self, grid):
                return lambda *a, **kw: calls.setdefault(self.name, (a, kw))

        for n in names:
            setattr(module, n, Recorder(n))
        try:
            launch()
        finally:
            for n, fn in originals.items():
                setattr(module, n, fn)
        return {n: (originals[n], *calls[n]) for n in names if n in calls}

    def signature(fn, args, constexprs):
        sig = {}
        for name, a in zip(fn.arg_names, args):
            if isinstance(a, torch.Tensor):
                sig[name] = "*" + types[a.dtype]
            elif isinstance(a, int):
                sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
            else:
                sig[name] = "fp32"
        sig.update({name: "constexpr" for name in constexprs})
        return {name: sig[name] for name in fn.arg_names}

    def divisibility(fn, args):
        # what Triton's launcher tells the compiler at run time: pointers
        # (fresh allocations) and integers that are multiples of 16; without
        # it loads are not vectorised and the K loop is not pipelined
        return {(i,): [["tt.divisibility", 16]] for i, (_, a) in enumerate(zip(fn.arg_names, args))
                if isinstance(a, torch.Tensor) or (isinstance(a, int) and a and a % 16 == 0)}

    def compile_all(name, arch, launches, gpu_kwargs):
        for kernel, (fn, args, kw) in launches.items():
            warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
            kw.update(gpu_kwargs.get(kernel, {}))
            src = ASTSource(fn, signature(fn, args, kw), constexprs=kw, attrs=divisibility(fn, args))
            binary = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": warps, "num_stages": stages})
            assert binary.asm["cubin"], (name, kernel)
            assert binary.metadata.shared <= SHARED_MEMORY_LIMIT[arch], (name, kernel, binary.metadata.shared)
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
