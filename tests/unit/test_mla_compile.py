"""The attention kernels compile for NVIDIA GPUs, within shared memory, at
heads wider than 256, checked without a GPU (tests.fixtures.triton_compile):
multi-head latent attention's one KV head of the latent and its rotary part
(kv_lora_rank 512 + qk_rope_head_dim 64 = 576, not a power of two: padded
to 1024 and masked), read as key and value at once, under 128 query heads
(DeepSeek-V3 at tensor-parallel degree 1: 8 programs of 16 heads each), 16
(degree 8) and GLM-4.7-Flash's 20 (two programs, the second of 4 heads),
and Gemma 4's 512-wide global heads (32 query heads on 4 KV heads), with
bf16 and fp8 caches. Register pressure is not checked here: it needs a GPU
(``tests/gpu/test_kernels_cuda.py`` runs the same shapes against the
reference).
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from tests.fixtures.triton_compile import compile_cubin, compile_in_subprocess, needs_ptxas, record_launches  # noqa: E402

# (head_dim, query heads, kv heads)
LAYOUTS = [(576, 128, 1), (576, 16, 1), (576, 20, 1), (512, 32, 4)]


def case_names() -> list[str]:
    names = []
    for d, hq, hk in LAYOUTS:
        tag = f"d={d} hq={hq} hk={hk}"
        names += [f"decode bf16 {tag}", f"decode fp8 {tag}", f"prefill bf16 {tag}"]
    return names


@needs_ptxas
@pytest.mark.slow
def test_attention_kernels_compile_at_latent_shapes():
    compile_in_subprocess(__file__, len(case_names()), timeout=590)


def _main() -> None:  # runs in the subprocess, without the interpreter
    import torch

    import splitserve.kernels.triton.decode_attention as dec
    import splitserve.kernels.triton.prefill_attention as pre

    def compile_case(name, module, kernel, launch, gpu_constexprs, arch=90):
        fn, calls = record_launches(module, (kernel,), launch)[kernel]
        args, kw = calls[0]
        kw = {**kw, **gpu_constexprs}
        options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        binary = compile_cubin(name, fn, args, kw, arch, options)
        print(f"compiled {name} sm_{arch} shared={binary.metadata.shared}", flush=True)

    from splitserve.kernels.triton._common import heads_per_program, next_pow2

    bf, f8 = torch.bfloat16, torch.float8_e4m3fn
    gpu_dot = dict(DOT_F32=False, PRECISION="tf32")
    bs = 16
    tables = torch.arange(64, dtype=torch.int32).view(4, 16)
    lens = torch.full((4,), 200, dtype=torch.int32)
    cu = torch.tensor([0, 100, 100, 101, 300], dtype=torch.int32)
    for d, hq, hk in LAYOUTS:
        tag = f"d={d} hq={hq} hk={hk}"
        cache = torch.zeros(64, bs, hk, d, dtype=bf)  # MLA: the latent is key and value
        cache8 = torch.zeros(64, bs, hk, d, dtype=f8)
        qd = torch.randn(4, hq, d, dtype=bf)
        decode_gpu = dict(gpu_dot, BLOCK_N=dec.WIDE_GPU_BLOCK_N)
        compile_case(f"decode bf16 {tag}", dec, "_decode_split_kernel",
                     lambda: dec.paged_decode_attention(qd, cache, cache, tables, lens, 0.1,
                                                        num_splits=1), decode_gpu)
        compile_case(f"decode fp8 {tag}", dec, "_decode_split_kernel",
                     lambda: dec.paged_decode_attention(qd, cache8, cache8, tables, lens, 0.1,
                                                        0.5, 0.5, num_splits=4), decode_gpu)
        gh = heads_per_program(hq // hk, next_pow2(d))
        block_m, block_q, block_n, warps = pre._tile_shape(gh, d, on_gpu=True, fp32=False)
        qp = torch.randn(300, hq, d, dtype=bf)
        compile_case(f"prefill bf16 {tag}", pre, "_paged_prefill_kernel",
                     lambda: pre.paged_attention(qp, cache, cache, tables, cu, lens, 0.1),
                     dict(gpu_dot, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
                          num_warps=warps))

if __name__ == "__main__":
    _main()
