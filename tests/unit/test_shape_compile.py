"""The attention-path Triton kernels compile for NVIDIA GPUs, within shared
memory, at head dims other than 128 and at GQA group sizes 4, 6 and 32
(MQA), checked without a GPU (tests.fixtures.triton_compile): head_dim
80 and 96 (not powers of two: the kernels pad to 128 and mask), 256 (the
widest tiles), with bf16, fp32 (sm_80's smaller shared memory) and fp8 KV.

test_triton_compile compiles every kernel at one Llama-3-8B shape; this file
covers the head layouts of tests.fixtures.shape_variants at GPU sizes.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from tests.fixtures.triton_compile import compile_cubin, compile_in_subprocess, needs_ptxas, record_launches  # noqa: E402

# (head_dim, query heads, kv heads): MQA, a group of 6, the widest heads
LAYOUTS = [(80, 32, 1), (96, 12, 2), (256, 16, 4)]


def case_names() -> list[str]:
    names = []
    for d, hq, hk in LAYOUTS:
        tag = f"d={d} hq={hq} hk={hk}"
        names += [f"rotary {tag}", f"store_kv {tag}", f"decode bf16 {tag}", f"decode fp8 sm80 {tag}",
                  f"prefill bf16 {tag}", f"prefill fp32 sm80 {tag}", f"prefill fp8 {tag}"]
    return names + ["qk rms_norm d=80", "qk rms_norm d=96"]


@needs_ptxas
@pytest.mark.slow
def test_attention_kernels_compile_at_every_head_layout():
    compile_in_subprocess(__file__, len(case_names()), timeout=590)


def _main() -> None:  # runs in the subprocess, without the interpreter
    import torch

    import splitserve.kernels.triton.decode_attention as dec
    import splitserve.kernels.triton.kv_store as store
    import splitserve.kernels.triton.prefill_attention as pre
    import splitserve.kernels.triton.rmsnorm as rms
    import splitserve.kernels.triton.rope as rope

    def compile_case(name, module, kernel, launch, gpu_constexprs=None, arch=90):
        fn, calls = record_launches(module, (kernel,), launch)[kernel]
        args, kw = calls[0]
        kw = {**kw, **(gpu_constexprs or {})}
        options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        binary = compile_cubin(name, fn, args, kw, arch, options)
        print(f"compiled {name} sm_{arch} shared={binary.metadata.shared}", flush=True)

    bf, f8, f32 = torch.bfloat16, torch.float8_e4m3fn, torch.float32
    gpu_dot = dict(DOT_F32=False, PRECISION="tf32")
    t, bs = 8, 16
    tables = torch.arange(64, dtype=torch.int32).view(4, 16)
    lens = torch.full((4,), 200, dtype=torch.int32)
    cu = torch.tensor([0, 100, 100, 101, 300], dtype=torch.int32)
    for d, hq, hk in LAYOUTS:
        tag = f"d={d} hq={hq} hk={hk}"
        q, k = torch.randn(t, hq, d, dtype=bf), torch.randn(t, hk, d, dtype=bf)
        compile_case(f"rotary {tag}", rope, "_rotary_embedding_kernel",
                     lambda: rope.rotary_embedding(torch.arange(t), q, k, torch.randn(64, d)))
        cache, cache8 = torch.zeros(64, bs, hk, d, dtype=bf), torch.zeros(64, bs, hk, d, dtype=f8)
        compile_case(f"store_kv {tag}", store, "_store_kv_kernel",
                     lambda: store.store_kv(k, k, cache, cache, torch.arange(t)))
        qd = torch.randn(4, hq, d, dtype=bf)
        decode_gpu = dict(gpu_dot, BLOCK_N=dec.GPU_BLOCK_N)
        compile_case(f"decode bf16 {tag}", dec, "_decode_split_kernel",
                     lambda: dec.paged_decode_attention(qd, cache, cache, tables, lens, 0.1, num_splits=1),
                     decode_gpu)
        compile_case(f"decode fp8 sm80 {tag}", dec, "_decode_split_kernel",
                     lambda: dec.paged_decode_attention(qd, cache8, cache8, tables, lens, 0.1, 0.5, 0.5,
                                                        num_splits=4), decode_gpu, 80)
        g = hq // hk
        for label, kv_cache, q_dtype, arch in (("prefill bf16", cache, bf, 90),
                                               ("prefill fp32 sm80", cache.float(), f32, 80),
                                               ("prefill fp8", cache8, bf, 90)):
            fp32 = q_dtype == f32
            block_m, block_q, block_n, warps = pre._tile_shape(g, d, on_gpu=True, fp32=fp32)
            qp = torch.randn(300, hq, d, dtype=q_dtype)
            dot = dict(DOT_F32=True, PRECISION="ieee") if fp32 else gpu_dot
            compile_case(f"{label} {tag}", pre, "_paged_prefill_kernel",
                         lambda: pre.paged_attention(qp, kv_cache, kv_cache, tables, cu, lens, 0.1, 0.5, 0.5),
                         dict(dot, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=warps),
                         arch)
    for d in (80, 96):  # Qwen3's per-head q/k norm: rows of head_dim
        x = torch.randn(t * 4, d, dtype=bf)
        compile_case(f"qk rms_norm d={d}", rms, "_rms_norm_kernel", lambda: rms.rms_norm(x, x[0], 1e-6))


if __name__ == "__main__":
    _main()
