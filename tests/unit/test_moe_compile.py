"""The fused MoE kernels compile to a cubin for sm_90 (H100/H200), checked without a GPU.

As in test_triton_compile.py: the launcher runs on CPU tensors with its
kernels replaced by recorders; the recorded arguments, with the tile sizes
the launcher picks on a GPU, go through ``triton.compile`` for sm_90 down
to cubin with the ptxas that ships with Triton. The compile runs in a
subprocess, without TRITON_INTERPRET (under which ``triton.jit`` makes
functions that cannot compile).
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
SHARED_MEMORY_LIMIT = 232448  # bytes per block on sm_90, opt-in maximum

# (name, dtype, tokens, experts, top_k, hidden, intermediate): a Mixtral-8x7B
# prefill batch (the largest row blocks), Qwen3-30B-A3B's 128 small experts
# decoding in fp32 (the most shared memory)
CASES = [
    ("mixtral prefill bf16", "bfloat16", 4096, 8, 2, 4096, 14336),
    ("qwen3_moe fp32", "float32", 64, 128, 8, 2048, 768),
]
KERNELS = ("_moe_gate_up_kernel", "_moe_down_kernel")


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas")
def test_fused_moe_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("compiled ")]
    assert len(compiled) == len(CASES) * len(KERNELS), proc.stdout


def _main() -> None:  # runs in the subprocess, without the interpreter
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import splitserve.kernels.triton.fused_moe as moe

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.int32: "i32", torch.int64: "i64"}

    def record(launch) -> dict:
        """kernel name -> (args, kwargs) of its launch by ``launch``."""
        calls, originals = {}, {n: getattr(moe, n) for n in KERNELS}

        class Recorder:
            def __init__(self, name):
                self.name = name

            def __getitem__(self, grid):
                return lambda *a, **kw: calls.setdefault(self.name, (a, kw))

        for n in KERNELS:
            setattr(moe, n, Recorder(n))
        try:
            launch()
        finally:
            for n, fn in originals.items():
                setattr(moe, n, fn)
        return {n: (originals[n], *calls[n]) for n in KERNELS}

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

    for name, dtype, t, e, k, h, i in CASES:
        dt = getattr(torch, dtype)
        x = torch.empty(t, h, dtype=dt)
        w_gate_up, w_down = torch.empty(e, 2 * i, h, dtype=dt), torch.empty(e, h, i, dtype=dt)
        ids = torch.randint(0, e, (t, k))
        weights = torch.rand(t, k)
        launches = record(lambda: moe.fused_moe(x, w_gate_up, w_down, weights, ids))
        block_m, block_n, block_k, warps, stages = moe._tile_shape(t * k, e, on_gpu=True)
        gpu = dict(DOT_F32=dt == torch.float32, PRECISION="ieee" if dt == torch.float32 else "tf32",
                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        for kernel, (fn, args, kw) in launches.items():
            kw = {key: v for key, v in kw.items() if key not in ("num_warps", "num_stages")}
            kw.update(gpu)
            src = ASTSource(fn, signature(fn, args, kw), constexprs=kw)
            binary = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": warps, "num_stages": stages})
            assert binary.asm["cubin"], name
            assert binary.metadata.shared <= SHARED_MEMORY_LIMIT, (name, kernel, binary.metadata.shared)
            print(f"compiled {name} {kernel} sm_90 BLOCK_M={block_m} shared={binary.metadata.shared}",
                  flush=True)


if __name__ == "__main__":
    _main()
