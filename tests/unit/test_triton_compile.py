"""Every Triton kernel compiles to a cubin for NVIDIA GPUs, checked without one.

The interpreter runs kernels as numpy and accepts code the GPU compiler
rejects (types, layouts, dot shapes). Here each launcher runs on CPU tensors
with its kernels replaced by recorders; the recorded arguments, with the
tile sizes the launcher picks on a GPU, go through ``triton.compile`` for
sm_90 (H100/H200), and sm_80 for the fp8-KV path, down to cubin via the
ptxas that ships with Triton.

The compile runs in a subprocess: this test session sets TRITON_INTERPRET=1,
under which ``triton.jit`` makes interpreted functions that cannot compile.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from tests.fixtures.triton_compile import compile_cubin, compile_in_subprocess, needs_ptxas, record_launches  # noqa: E402


@needs_ptxas
def test_kernels_compile_for_nvidia_targets():
    compile_in_subprocess(__file__, len(CASE_NAMES), timeout=540)


CASE_NAMES = [
    "rms_norm residual bf16", "rotary_embedding bf16", "silu_and_mul bf16", "gelu_tanh_and_mul bf16", "store_kv bf16",
    "store_kv fp8", "pack_kv", "unpack_kv", "decode one split bf16", "decode split fp8 sm90",
    "decode split fp8 sm80", "decode reduce", "prefill G=4 bf16", "prefill G=7 fp8", "prefill G=4 fp32 sm80",
    "decode softcap window bf16", "prefill softcap window bf16", "decode sinks window bf16",
    "prefill sinks window bf16", "decode alibi bf16", "prefill alibi bf16",
]


def _main() -> None:  # runs in the subprocess, without the interpreter
    import torch

    import splitserve.kernels.triton.activation as act
    import splitserve.kernels.triton.decode_attention as dec
    import splitserve.kernels.triton.kv_pack as pack
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

    bf, f8 = torch.bfloat16, torch.float8_e4m3fn
    t, d, hq, hk, bs = 8, 128, 32, 8, 16  # Llama-3-8B attention shape
    x = torch.randn(t, 4096, dtype=bf)
    compile_case("rms_norm residual bf16", rms, "_rms_norm_kernel",
                 lambda: rms.rms_norm(x, x[0], 1e-6, x.clone()))
    q, k = torch.randn(t, hq, d, dtype=bf), torch.randn(t, hk, d, dtype=bf)
    compile_case("rotary_embedding bf16", rope, "_rotary_embedding_kernel",
                 lambda: rope.rotary_embedding(torch.arange(t), q, k, torch.randn(64, d)))
    compile_case("silu_and_mul bf16", act, "_act_and_mul_kernel",
                 lambda: act.silu_and_mul(torch.randn(t, 2 * 14336, dtype=bf)))
    compile_case("gelu_tanh_and_mul bf16", act, "_act_and_mul_kernel",
                 lambda: act.gelu_tanh_and_mul(torch.randn(t, 2 * 16384, dtype=bf)))
    cache, cache8 = torch.zeros(64, bs, hk, d, dtype=bf), torch.zeros(64, bs, hk, d, dtype=f8)
    compile_case("store_kv bf16", store, "_store_kv_kernel",
                 lambda: store.store_kv(k, k, cache, cache, torch.arange(t)))
    compile_case("store_kv fp8", store, "_store_kv_kernel",
                 lambda: store.store_kv(k, k, cache8, cache8, torch.arange(t), 0.1, 0.2))
    kv = torch.zeros(4, 2, 64, bs, hk, d, dtype=bf)
    compile_case("pack_kv", pack, "_copy_blocks_kernel", lambda: pack.pack_kv(kv, torch.arange(5), 1, 3))
    compile_case("unpack_kv", pack, "_copy_blocks_kernel",
                 lambda: pack.unpack_kv(kv[:2, :, :5].clone(), kv, torch.arange(5), 1))

    gpu_dot = dict(DOT_F32=False, PRECISION="tf32")
    tables = torch.arange(64, dtype=torch.int32).view(4, 16)
    lens = torch.full((4,), 200, dtype=torch.int32)
    qd = torch.randn(4, hq, d, dtype=bf)
    decode_gpu = dict(gpu_dot, BLOCK_N=dec.GPU_BLOCK_N)
    compile_case("decode one split bf16", dec, "_decode_split_kernel",
                 lambda: dec.paged_decode_attention(qd, cache, cache, tables, lens, 0.1, num_splits=1), decode_gpu)
    for arch in (90, 80):
        compile_case(f"decode split fp8 sm{arch}", dec, "_decode_split_kernel",
                     lambda: dec.paged_decode_attention(qd, cache8, cache8, tables, lens, 0.1, 0.5, 0.5,
                                                        num_splits=4), decode_gpu, arch)
    compile_case("decode softcap window bf16", dec, "_decode_split_kernel",  # Gemma 2
                 lambda: dec.paged_decode_attention(qd, cache, cache, tables, lens, 0.1, sliding_window=64,
                                                    softcap=50.0, num_splits=4), decode_gpu)
    compile_case("decode reduce", dec, "_decode_reduce_kernel",
                 lambda: dec.paged_decode_attention(qd, cache, cache, tables, lens, 0.1, num_splits=4))

    cu = torch.tensor([0, 100, 100, 101, 300], dtype=torch.int32)
    f32 = torch.float32
    for name, heads, kv_cache, q_dtype, arch in (
        ("prefill G=4 bf16", 32, cache, bf, 90),
        ("prefill G=7 fp8", 28, torch.zeros(64, bs, 4, d, dtype=f8), bf, 90),
        ("prefill G=4 fp32 sm80", 32, cache.float(), f32, 80),  # the largest tiles in bytes
    ):
        g = heads // kv_cache.shape[2]
        fp32 = q_dtype == f32
        block_m, block_q, block_n, warps = pre._tile_shape(g, d, on_gpu=True, fp32=fp32)
        qp = torch.randn(300, heads, d, dtype=q_dtype)
        dot = dict(DOT_F32=True, PRECISION="ieee") if fp32 else gpu_dot
        compile_case(name, pre, "_paged_prefill_kernel",
                     lambda: pre.paged_attention(qp, kv_cache, kv_cache, tables, cu, lens, 0.1, 0.5, 0.5),
                     dict(dot, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=warps), arch)
    block_m, block_q, block_n, warps = pre._tile_shape(4, d, on_gpu=True)
    qp = torch.randn(300, 32, d, dtype=bf)
    compile_case("prefill softcap window bf16", pre, "_paged_prefill_kernel",
                 lambda: pre.paged_attention(qp, cache, cache, tables, cu, lens, 0.1, sliding_window=64,
                                             softcap=50.0),
                 dict(gpu_dot, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=warps))
    sinks = torch.randn(hq)  # gpt-oss: one float32 logit per query head
    compile_case("decode sinks window bf16", dec, "_decode_split_kernel",
                 lambda: dec.paged_decode_attention(qd, cache, cache, tables, lens, 0.1, sliding_window=64,
                                                    num_splits=4, sinks=sinks), decode_gpu)
    compile_case("prefill sinks window bf16", pre, "_paged_prefill_kernel",
                 lambda: pre.paged_attention(qp, cache, cache, tables, cu, lens, 0.1, sliding_window=64,
                                             sinks=sinks),
                 dict(gpu_dot, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=warps))
    slopes = torch.rand(hq)  # Bloom, MPT, Falcon alibi
    compile_case("decode alibi bf16", dec, "_decode_split_kernel",
                 lambda: dec.paged_decode_attention(qd, cache, cache, tables, lens, 0.1, num_splits=4,
                                                    alibi_slopes=slopes), decode_gpu)
    compile_case("prefill alibi bf16", pre, "_paged_prefill_kernel",
                 lambda: pre.paged_attention(qp, cache, cache, tables, cu, lens, 0.1, alibi_slopes=slopes),
                 dict(gpu_dot, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=warps))


if __name__ == "__main__":
    _main()
