"""The batched LoRA kernels compile to a cubin for sm_90 (H100/H200), checked without a GPU.

As in test_moe_compile.py: the launchers run on CPU tensors with their
kernels replaced by recorders; the recorded arguments, with the tile sizes
the launchers pick on a GPU, go through ``triton.compile`` for sm_90 down
to cubin with the ptxas that ships with Triton, in a subprocess without
TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from tests.fixtures.triton_compile import compile_cubin, compile_in_subprocess, needs_ptxas, record_launches  # noqa: E402

# (name, dtype, tokens, in_features, slices, rank, slots): Llama-3-8B's fused
# q/k/v in bf16 for a prefill chunk, its down projection decoding in fp32 at
# the largest rank
CASES = [
    ("qkv prefill bf16", "bfloat16", 2048, 4096, (4096, 1024, 1024), 16, 8),
    ("down decode fp32", "float32", 64, 14336, (4096,), 64, 4),
]
KERNELS = ("_lora_shrink_kernel", "_lora_expand_kernel")


@needs_ptxas
def test_lora_kernels_compile_for_sm90():
    compile_in_subprocess(__file__, len(CASES) * len(KERNELS), timeout=300)


def _main() -> None:  # runs in the subprocess, without the interpreter
    import torch

    import splitserve.kernels.triton.lora as lora
    from splitserve.kernels.lora import lora_meta

    for name, dtype, t, k, slices, rank, slots in CASES:
        dt = getattr(torch, dtype)
        m = sum(slices)
        offsets = [0]
        for w in slices:
            offsets.append(offsets[-1] + w)
        x, y = torch.empty(t, k, dtype=dt), torch.empty(t, m, dtype=dt)
        a = torch.empty(slots, len(slices) * rank, k, dtype=dt)
        b = torch.empty(slots, m, rank, dtype=dt)
        meta = lora_meta([i % (slots + 1) - 1 for i in range(t)], slots)
        h = torch.empty(t, len(slices) * rank, dtype=torch.float32)

        def launch():
            lora.lora_shrink(x, a, meta)
            lora.lora_expand(y, h, b, meta, offsets)

        launches = record_launches(lora, KERNELS, launch)
        precision = dict(DOT_F32=dt == torch.float32,
                         PRECISION="ieee" if dt == torch.float32 else "tf32")
        widths = {"_lora_shrink_kernel": len(slices) * rank, "_lora_expand_kernel": max(slices)}
        for kernel, (fn, calls) in launches.items():
            args, kw = calls[0]
            block_m, block_n, block_k = lora._tiles(True, widths[kernel])
            kw = dict(kw, **precision, BLOCK_M=block_m, BLOCK_N=block_n)
            if "BLOCK_K" in kw:
                kw["BLOCK_K"] = block_k
            binary = compile_cubin((name, kernel), fn, args, kw, 90, {"num_warps": 4, "num_stages": 3})
            print(f"compiled {name} {kernel} sm_90 BLOCK_N={block_n} shared={binary.metadata.shared}",
                  flush=True)


if __name__ == "__main__":
    _main()
