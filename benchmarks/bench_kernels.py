"""Roofline benchmark of the Triton kernels on one CUDA GPU.

Measures the device's limits in the same run -- device-to-device copy
bandwidth and a large bf16 matmul -- then each kernel's achieved GB/s
(memory-bound ops) or TFLOP/s (prefill attention) and its fraction of the
measured limit, beside the torch reference's time. Prints a table and
writes a JSON record with ``--out``.

    python benchmarks/bench_kernels.py --out bench.json

Shapes are Llama-3-8B's (32 query heads, 8 kv heads, head_dim 128, hidden
4096, intermediate 14336), KV blocks of 16 tokens. Timing: CUDA events,
warmup, median of ``--iters`` runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitserve.cluster.bench.record import write_record  # noqa: E402
from splitserve.cluster.bench.report import table  # noqa: E402

HQ, HK, D, BS = 32, 8, 128, 16
HIDDEN, INTER, LAYERS = 4096, 14336, 32


@dataclass
class Result:
    name: str
    shape: str
    ms: float
    bound: str  # "memory" or "compute"
    achieved: float  # GB/s or TFLOP/s
    limit: float  # measured copy GB/s or matmul TFLOP/s
    ratio: float
    reference_ms: float | None


def time_ms(fn: Callable[[], object], iters: int, warmup: int = 3, cuda: bool = True) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` calls: CUDA events when
    ``cuda``, else the wall clock."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(iters: int) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far above L2
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / ms / 1e6  # read + write


def matmul_tflops(iters: int) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, iters)
    return 2 * n**3 / ms / 1e9


class Paged:
    """A KV cache holding ``batch`` sequences of ``ctx`` tokens in shuffled blocks."""

    def __init__(self, batch: int, ctx: int, kv_dtype: torch.dtype):
        per_seq = math.ceil(ctx / BS)
        nb = batch * per_seq
        self.block_tables = torch.randperm(nb, device="cuda").view(batch, per_seq).int()
        self.context_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.k = torch.randn(nb, BS, HK, D, device="cuda").to(kv_dtype)
        self.v = torch.randn(nb, BS, HK, D, device="cuda").to(kv_dtype)
        self.kv_bytes = 2 * batch * ctx * HK * D * self.k.element_size()


def bench(args) -> tuple[dict, list[Result]]:
    from splitserve.kernels import reference as ref
    from splitserve.kernels.triton import activation, decode_attention, kv_pack, kv_store, prefill_attention, rmsnorm

    it = args.iters
    bw, peak = copy_bandwidth_gbps(it), matmul_tflops(it)
    limits = {"copy_gbps": bw, "bf16_matmul_tflops": peak}
    results: list[Result] = []

    def memory(name, shape, nbytes, fn, ref_fn=None):
        ms = time_ms(fn, it)
        gbps = nbytes / ms / 1e6
        ref_ms = time_ms(ref_fn, it) if ref_fn and not args.skip_reference else None
        results.append(Result(name, shape, ms, "memory", gbps, bw, gbps / bw, ref_ms))

    def compute(name, shape, flops, fn, ref_fn=None):
        ms = time_ms(fn, it)
        tflops = flops / ms / 1e9
        ref_ms = time_ms(ref_fn, it) if ref_fn and not args.skip_reference else None
        results.append(Result(name, shape, ms, "compute", tflops, peak, tflops / peak, ref_ms))

    bf = torch.bfloat16
    scale = D**-0.5
    for batch, ctx in ((64, 2048), (1, 32768), (256, 1024)):
        for kv_dtype in (bf, torch.float8_e4m3fn):
            c = Paged(batch, ctx, kv_dtype)
            q = torch.randn(batch, HQ, D, device="cuda", dtype=bf)
            a = (q, c.k, c.v, c.block_tables, c.context_lens, scale, 0.05, 0.05)
            memory(f"decode_attention kv={str(kv_dtype)[6:]}", f"B={batch} ctx={ctx}",
                   c.kv_bytes + 2 * q.numel() * q.element_size(),
                   lambda: decode_attention.paged_decode_attention(*a),
                   lambda: ref.paged_decode_attention(*a))
            del c

    for batch, prompt in ((4, 2048), (1, 8192)):
        c = Paged(batch, prompt, bf)
        q = torch.randn(batch * prompt, HQ, D, device="cuda", dtype=bf)
        cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * prompt
        a = (q, c.k, c.v, c.block_tables, cu, c.context_lens, scale)
        causal_pairs = batch * prompt * (prompt + 1) / 2  # (query, key) pairs a causal mask keeps
        compute("prefill_attention", f"B={batch} prompt={prompt}", 4 * causal_pairs * HQ * D,
                lambda: prefill_attention.paged_attention(*a), lambda: ref.paged_attention(*a))
        del c

    kv = torch.randn(LAYERS, 2, 4096, BS, HK, D, device="cuda", dtype=bf)
    ids = torch.randperm(4096, device="cuda")[:512]  # an 8k-token sequence
    buf = kv_pack.pack_kv(kv, ids, 0, LAYERS)
    moved = 2 * buf.numel() * buf.element_size()
    memory("pack_kv", f"{LAYERS} layers x {len(ids)} blocks", moved,
           lambda: kv_pack.pack_kv(kv, ids, 0, LAYERS), lambda: ref.pack_kv(kv, ids, 0, LAYERS))
    memory("unpack_kv", f"{LAYERS} layers x {len(ids)} blocks", moved,
           lambda: kv_pack.unpack_kv(buf, kv, ids, 0), lambda: ref.unpack_kv(buf, kv, ids, 0))
    del kv, buf

    t = 8192
    x = torch.randn(t, HIDDEN, device="cuda", dtype=bf)
    w = torch.randn(HIDDEN, device="cuda", dtype=bf)
    r = torch.randn_like(x)
    memory("rms_norm+residual", f"T={t} D={HIDDEN}", 4 * x.numel() * 2,
           lambda: rmsnorm.rms_norm(x, w, 1e-5, r), lambda: ref.rms_norm(x, w, 1e-5, r))
    g = torch.randn(t, 2 * INTER, device="cuda", dtype=bf)
    memory("silu_and_mul", f"T={t} I={INTER}", g.numel() * 2 * 3 // 2,
           lambda: activation.silu_and_mul(g), lambda: ref.silu_and_mul(g))
    key = torch.randn(t, HK, D, device="cuda", dtype=bf)
    k_cache = torch.empty(t // BS + 1, BS, HK, D, device="cuda", dtype=bf)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(t, device="cuda")
    memory("store_kv", f"T={t}", 4 * key.numel() * 2,
           lambda: kv_store.store_kv(key, key, k_cache, v_cache, slots),
           lambda: ref.store_kv(key, key, k_cache, v_cache, slots))
    recurrent_decode(memory)
    latent_decode(memory)
    return limits, results


def recurrent_decode(memory) -> None:
    """The recurrent layers' decode steps at batch 64, in place on 64 of 72
    state slots: bytes moved = the states read and written once (float32)."""
    from splitserve.kernels import recurrent as rref
    from splitserve.kernels.triton import recurrent

    b, dev, f32 = 64, "cuda", torch.float32
    slots = torch.randperm(b + 8, device=dev)[:b]
    h, dk, dv = 32, 128, 128  # Qwen3-Next's Gated DeltaNet at TP 1
    q, k = torch.randn(b, h, dk, device=dev), torch.randn(b, h, dk, device=dev)
    v, g, beta = torch.randn(b, h, dv, device=dev), -torch.rand(b, h, device=dev), torch.rand(b, h, device=dev)
    state = torch.zeros(b + 8, h, dk, dv, device=dev, dtype=f32)
    memory("gated_delta_step", f"B={b} H={h} {dk}x{dv}", 2 * b * h * dk * dv * 4,
           lambda: recurrent.gated_delta_step(q, k, v, g, beta, state, slots),
           lambda: rref.gated_delta_step(q, k, v, g, beta, state, slots))
    h, p, n = 128, 64, 128  # Nemotron-H's Mamba-2
    x, dt = torch.randn(b, h, p, device=dev), torch.rand(b, h, device=dev)
    A, D = -torch.rand(h, device=dev), torch.randn(h, device=dev)
    B, C = torch.randn(b, h, n, device=dev), torch.randn(b, h, n, device=dev)
    state = torch.zeros(b + 8, h, p, n, device=dev, dtype=f32)
    memory("ssm_scan_step", f"B={b} H={h} {p}x{n}", 2 * b * h * p * n * 4,
           lambda: recurrent.ssm_scan_step(x, dt, A, B, C, D, state, slots),
           lambda: rref.ssm_scan_step(x, dt, A, B, C, D, state, slots))
    inner, n = 8192, 16  # Jamba's Mamba-1
    u, dt = torch.randn(b, inner, device=dev), torch.rand(b, inner, device=dev)
    A, B, C = -torch.rand(inner, n, device=dev), torch.randn(b, n, device=dev), torch.randn(b, n, device=dev)
    state = torch.zeros(b + 8, inner, n, device=dev, dtype=f32)
    memory("selective_scan_step", f"B={b} inner={inner} N={n}", 2 * b * inner * n * 4,
           lambda: recurrent.selective_scan_step(u, dt, A, B, C, state, slots),
           lambda: rref.selective_scan_step(u, dt, A, B, C, state, slots))


def latent_decode(memory) -> None:
    """Multi-head latent attention's decode (DeepSeek-V3 at TP 1: one 576-wide
    latent KV head, key and value at once, under 128 query heads) at batch 64
    and 4096 tokens: bytes = the latent read once (the kernels read it once
    per 16 heads, from L2 after the first)."""
    from splitserve.kernels import reference as ref
    from splitserve.kernels.triton import decode_attention

    b, ctx, hq, d, bs = 64, 4096, 128, 576, 16
    blocks = b * ctx // bs
    latent = torch.randn(blocks, bs, 1, d, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(blocks, device="cuda", dtype=torch.int64).to(torch.int32).view(b, -1)
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    a = (q, latent, latent, tables, lens, d ** -0.5)
    memory("decode_attention latent", f"B={b} ctx={ctx} H={hq} L={d}", latent.numel() * 2,
           lambda: decode_attention.paged_decode_attention(*a), lambda: ref.paged_decode_attention(*a))


def print_table(limits: dict, results: list[Result]) -> None:
    print(f"device limits: copy {limits['copy_gbps']:.0f} GB/s, "
          f"bf16 matmul {limits['bf16_matmul_tflops']:.0f} TFLOP/s")
    rows = [[r.name, r.shape, r.ms, f"{r.achieved:.1f} {'GB/s' if r.bound == 'memory' else 'TFLOP/s'}",
             f"{r.ratio:.1%}", r.reference_ms if r.reference_ms is not None else "-"] for r in results]
    print(table(rows, ["kernel", "shape", "ms", "achieved", "of limit", "torch ms"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON record here")
    p.add_argument("--iters", type=int, default=20, help="timed runs per measurement (median reported)")
    p.add_argument("--skip-reference", action="store_true", help="do not time the torch reference ops")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    import triton

    limits, results = bench(args)
    print_table(limits, results)
    write_record(str(args.out) if args.out else None, "kernels",
                 {"triton": triton.__version__, "iters": args.iters, "limits": limits,
                  "kernels": [asdict(r) for r in results]})
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
