"""The fused MoE kernels compile to a cubin for sm_90 (H100/H200), checked without a GPU.

As in test_triton_compile.py: the launcher runs on CPU tensors with its
kernels replaced by recorders; the recorded arguments, with the tile sizes
the launcher picks on a GPU, go through ``triton.compile`` for sm_90 down
to cubin with the ptxas that ships with Triton. The compile runs in a
subprocess, without TRITON_INTERPRET (under which ``triton.jit`` makes
functions that cannot compile).
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from tests.fixtures.triton_compile import compile_cubin, compile_in_subprocess, needs_ptxas, record_launches  # noqa: E402

# (name, dtype, tokens, experts, top_k, hidden, intermediate): a Mixtral-8x7B
# prefill batch (the largest row blocks), Qwen3-30B-A3B's 128 small experts
# decoding in fp32 (the most shared memory)
CASES = [
    ("mixtral prefill bf16", "bfloat16", 4096, 8, 2, 4096, 14336),
    ("qwen3_moe fp32", "float32", 64, 128, 8, 2048, 768),
]
KERNELS = ("_moe_gate_up_kernel", "_moe_down_kernel")


@needs_ptxas
def test_fused_moe_compiles_for_sm90():
    compile_in_subprocess(__file__, len(CASES) * len(KERNELS), timeout=300)


def _main() -> None:  # runs in the subprocess, without the interpreter
    import torch

    import splitserve.kernels.triton.fused_moe as moe

    for name, dtype, t, e, k, h, i in CASES:
        dt = getattr(torch, dtype)
        x = torch.empty(t, h, dtype=dt)
        w_gate_up, w_down = torch.empty(e, 2 * i, h, dtype=dt), torch.empty(e, h, i, dtype=dt)
        ids = torch.randint(0, e, (t, k))
        weights = torch.rand(t, k)
        launches = record_launches(moe, KERNELS, lambda: moe.fused_moe(x, w_gate_up, w_down, weights, ids))
        block_m, block_n, block_k, warps, stages = moe._tile_shape(t * k, e, on_gpu=True)
        gpu = dict(DOT_F32=dt == torch.float32, PRECISION="ieee" if dt == torch.float32 else "tf32",
                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        for kernel, (fn, calls) in launches.items():
            args, kw = calls[0]
            kw = {key: v for key, v in kw.items() if key not in ("num_warps", "num_stages")}
            kw.update(gpu)
            binary = compile_cubin((name, kernel), fn, args, kw, 90, {"num_warps": warps, "num_stages": stages})
            print(f"compiled {name} {kernel} sm_90 BLOCK_M={block_m} shared={binary.metadata.shared}",
                  flush=True)


if __name__ == "__main__":
    _main()
