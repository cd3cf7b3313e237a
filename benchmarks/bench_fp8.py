"""FP8 weights against bf16 ones: weight memory, decode tokens/s, perplexity, kernels.

Engine (any device): one bf16 checkpoint of a Llama shape, served four
ways in the same run: as it is (on the CPU the engine computes in float32,
so its weights sit in memory as float32), with ``dtype=bfloat16`` (bf16
weights and activations), with ``weight_dtype=fp8`` (projections in e4m3
with one scale per output channel; the CPU widens each for the matmul that
uses it; embeddings and the rest in the engine's dtype), and fp8 with the
rest in bf16. For each: parameter bytes (projections, and all),
and decode tokens/s at batch 1 and batch 8 (short prompts, 32 greedy
tokens each), passes alternated ``--runs`` times; ratios are fp8 / bf16
within each pass, reported as a range.

Perplexity: the embedded default model (trained; see
``benchmarks/bench_default_model.py`` for its full held-out scoring) scores
the last part of its held-out text through ``SamplingParams.prompt_logprobs``,
with bf16 weights, fp8 weights and an fp8 KV cache.

Kernels (CUDA only): the fp8 GEMMs of ``splitserve.kernels.triton.fp8_gemm``
on Llama-3.1-8B projection shapes, against cuBLAS bf16 on the same shapes
and against this GPU's measured peaks (a large bf16 matmul; a large fp8
``torch._scaled_mm`` where torch has it) and copy bandwidth.

    python -m benchmarks.bench_fp8 --out bench-results/fp8-cpu.json
    python -m benchmarks.bench_fp8 --device cuda --out gpu-results/fp8.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_engine import build_checkpoint, prompts
from splitserve.cluster.bench.record import write_record
from splitserve.cluster.bench.report import table

VARIANTS = {  # name -> EngineConfig overrides
    "checkpoint dtype": {},
    "bf16": {"dtype": "bfloat16"},
    "fp8": {"weight_dtype": "fp8"},
    "fp8, rest bf16": {"weight_dtype": "fp8", "dtype": "bfloat16"},
}
BATCHES = (1, 8)
PROMPT_LEN, NEW_TOKENS = 16, 32


def engine(path: Path, device: str, **overrides):
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(path), device=device, num_blocks=1024, block_size=16,
                                  max_num_seqs=max(BATCHES), enable_prefix_caching=False, **overrides))


def weight_bytes(model) -> dict[str, int]:
    proj = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.startswith("layers.") and "norm" not in n)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"projection_bytes": proj, "total_bytes": total}


def decode_tok_s(eng, batch: int, vocab: int) -> float:
    from splitserve.engine.sampling_params import SamplingParams

    ps = prompts(batch, PROMPT_LEN, vocab, seed=batch)
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    eng.generate(ps[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm
    t0 = time.perf_counter()
    n = sum(len(r.token_ids) for r in eng.generate(ps, sp))
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def bench_engine(path: Path, device: str, runs: int) -> dict:
    engines = {name: engine(path, device, **kw) for name, kw in VARIANTS.items()}
    vocab = next(iter(engines.values())).model_cfg.vocab_size
    memory = {name: weight_bytes(e.runner.model) for name, e in engines.items()}
    rates = {(name, b): [] for name in engines for b in BATCHES}
    for _ in range(runs):  # alternate variants within each pass: they share the machine's mood
        for b in BATCHES:
            for name, eng in engines.items():
                rates[(name, b)].append(decode_tok_s(eng, b, vocab))
    result = {"memory": memory, "decode": []}
    for b in BATCHES:
        for name in engines:
            r = rates[(name, b)]
            ratio = [x / y for x, y in zip(rates[("fp8", b)], r)]
            result["decode"].append({"variant": name, "batch": b, "tok_s": r,
                                     "fp8_over_this": ratio})
    return result


def perplexity(device: str, windows: int, window: int) -> list[dict]:
    """The default model's perplexity on the last ``windows`` x ``window``
    tokens of its held-out text, per variant."""
    from splitserve.engine.default_model import HELDOUT_PATH, default_model_path
    from splitserve.engine.sampling_params import SamplingParams

    path = default_model_path()
    out = []
    for name, kw in (("bf16 weights", {}), ("fp8 weights", {"weight_dtype": "fp8"}),
                     ("fp8 KV cache", {"kv_cache_dtype": "fp8"}),
                     ("fp8 weights + fp8 KV", {"weight_dtype": "fp8", "kv_cache_dtype": "fp8"})):
        eng = engine(path, device, **kw)
        ids = eng.tokenize(HELDOUT_PATH.read_text(encoding="utf-8"))
        chunks = [ids[len(ids) - (i + 1) * window:len(ids) - i * window] for i in range(windows)]
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        nll = [-lp.logprob for r in eng.generate(chunks, sp) for lp in r.prompt_logprobs[1:]]
        out.append({"variant": name, "tokens": len(nll), "perplexity": math.exp(statistics.fmean(nll))})
    base = out[0]["perplexity"]
    for row in out:
        row["relative_increase"] = row["perplexity"] / base - 1
    return out


# Llama-3.1-8B projections: (name, N, K)
GPU_SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
GPU_TOKENS = (1, 16, 128, 1024, 4096)


def cuda_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def bench_kernels() -> dict:
    from benchmarks.bench_engine_roofline import matmul_peak
    from splitserve.kernels.fp8_gemm import quantize_weight
    from splitserve.kernels.triton import fp8_gemm as tri

    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    bf16_peak = matmul_peak(dev, torch.bfloat16, 8192, 10)  # FLOP/s
    fp8_peak = None
    if hasattr(torch, "_scaled_mm") and cap >= (8, 9):
        a = torch.randn(8192, 8192, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(8192, 8192, device=dev).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=dev)
        ms = cuda_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        fp8_peak = 2 * 8192**3 / ms / 1e-3
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    copy_bw = 2 * buf.numel() / cuda_ms(lambda: buf.clone(), iters=10) / 1e-3  # bytes/s, read + write
    del buf
    rows = []
    for name, n, k in GPU_SHAPES:
        w = torch.randn(n, k, device=dev) * k**-0.5
        wb = w.to(torch.bfloat16)
        for groups_name, groups in (("channel", (1, k)), ("block128", (128, 128))):
            w8, scale = quantize_weight(w, *groups)
            for m in GPU_TOKENS:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                bf16_ms = cuda_ms(lambda: x @ wb.t())
                row = {"shape": name, "n": n, "k": k, "tokens": m, "scales": groups_name, "bf16_ms": bf16_ms}
                ops = {"w8a16": tri.fp8_w8a16_linear}
                if cap >= (8, 9):
                    ops["w8a8"] = tri.fp8_w8a8_linear
                for op_name, fn in ops.items():
                    ms = cuda_ms(lambda: fn(x, w8, scale, *groups))
                    flops = 2 * m * n * k / ms / 1e-3
                    peak = fp8_peak if op_name == "w8a8" and fp8_peak else bf16_peak
                    row[f"{op_name}_ms"] = ms
                    row[f"{op_name}_speedup_vs_bf16"] = bf16_ms / ms
                    row[f"{op_name}_of_peak"] = flops / peak
                    row[f"{op_name}_of_bandwidth"] = (n * k + 2 * m * (n + k)) / (ms * 1e-3) / copy_bw
                rows.append(row)
    return {"capability": list(cap), "bf16_peak_tflops": bf16_peak / 1e12,
            "fp8_peak_tflops": None if fp8_peak is None else fp8_peak / 1e12,
            "copy_gbps": copy_bw / 1e9, "gemms": rows}


def fmt_range(xs: list[float], digits: int = 2) -> str:
    return f"{min(xs):.{digits}f}-{max(xs):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--shape", default="llama-60m", help="benchmarks.bench_engine shape")
    ap.add_argument("--runs", type=int, default=3, help="alternated passes")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--ppl-window", type=int, default=256, help="tokens per scored prompt")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results: dict = {"device": args.device, "shape": args.shape}
    if not args.skip_engine:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = build_checkpoint(Path(tmp) / "ckpt", args.shape, "bfloat16")
            results["engine"] = eng = bench_engine(ckpt, args.device, args.runs)
        print(f"{args.shape} bf16 checkpoint on {args.device}: weight memory")
        print(table([[name, f"{m['projection_bytes'] / 2**20:.1f}", f"{m['total_bytes'] / 2**20:.1f}"]
                     for name, m in eng["memory"].items()],
                    ["variant", "projections MiB", "all parameters MiB"]))
        print(f"decode tokens/s ({args.runs} alternated passes; range), ratio fp8 / variant per pass")
        print(table([[d["variant"], d["batch"], fmt_range(d["tok_s"], 1), fmt_range(d["fp8_over_this"])]
                     for d in eng["decode"]], ["variant", "batch", "tok/s", "fp8 / this"]))
        results["perplexity"] = ppl = perplexity(args.device, args.ppl_windows, args.ppl_window)
        print("default model (RANDOM weights: a mechanism check, not a quality figure), perplexity "
              f"over {ppl[0]['tokens']} corpus tokens")
        print(table([[r["variant"], f"{r['perplexity']:.2f}", f"{100 * r['relative_increase']:+.2f}%"]
                     for r in ppl], ["variant", "perplexity", "vs bf16"]))
    if args.device == "cuda":
        results["kernels"] = k = bench_kernels()
        print(f"fp8 GEMMs, sm_{k['capability'][0]}{k['capability'][1]}: bf16 peak "
              f"{k['bf16_peak_tflops']:.0f} TFLOP/s, fp8 peak {k['fp8_peak_tflops']} TFLOP/s, "
              f"copy {k['copy_gbps']:.0f} GB/s")
        cols = [c for c in ("w8a8", "w8a16") if f"{c}_ms" in k["gemms"][0]]
        print(table([[g["shape"], g["tokens"], g["scales"], f"{g['bf16_ms']:.3f}",
                      *[f"{g[f'{c}_ms']:.3f} ({g[f'{c}_speedup_vs_bf16']:.2f}x, "
                        f"{g[f'{c}_of_peak']:.2f} peak, {g[f'{c}_of_bandwidth']:.2f} bw)" for c in cols]]
                     for g in k["gemms"]], ["shape", "tokens", "scales", "bf16 ms", *cols]))
    write_record(str(args.out) if args.out else None, "fp8", results)


if __name__ == "__main__":
    main()
