"""The fused MoE Triton kernel against a per-expert loop of torch matmuls.

For each shape, routing is drawn at random (softmax top-k of Gaussian
logits), both implementations run on the same inputs, the kernel's output is
checked against the loop's (``splitserve.kernels.reference.fused_moe``) and
both are timed. Prints a table and writes a JSON record with ``--out``.

    python benchmarks/bench_moe.py --out moe.json

On CUDA: Mixtral-8x7B (8 experts, top-2, hidden 4096, intermediate 14336)
and Qwen3-30B-A3B (128 experts, top-8, hidden 2048, intermediate 768) in
bf16, from one decoding token to prefill batches; CUDA events, warmup,
median of ``--iters`` runs. Without CUDA the kernel runs in Triton's
interpreter (TRITON_INTERPRET=1 is set here) on tiny shapes: those numbers
say the kernel is correct, nothing about its speed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import time_ms  # noqa: E402
from splitserve.cluster.bench.record import write_record  # noqa: E402
from splitserve.cluster.bench.report import table  # noqa: E402

# name -> (experts, top_k, hidden, intermediate)
MODELS = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "tiny": (8, 2, 64, 96),
}
GPU_TOKENS = (1, 16, 64, 256, 1024, 4096)
CPU_TOKENS = (1, 7, 40)
# largest |fused - loop| accepted, as a fraction of max |loop| (tests/unit/test_moe_kernel.py)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 3e-2}


@dataclass
class Result:
    model: str
    tokens: int
    dtype: str
    fused_ms: float
    loop_ms: float
    speedup: float  # loop_ms / fused_ms
    fused_tflops: float
    weight_gbps: float  # bytes of the experts the batch uses / fused time
    max_abs_err: float  # fused against the loop
    max_abs_out: float
    correct: bool  # max_abs_err within TOLERANCE of max_abs_out


def inputs(t: int, e: int, k: int, h: int, i: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, h, generator=g, device=device).to(dtype)
    w_gate_up = (torch.randn(e, 2 * i, h, generator=g, device=device) * h**-0.5).to(dtype)
    w_down = (torch.randn(e, h, i, generator=g, device=device) * i**-0.5).to(dtype)
    logits = torch.randn(t, e, generator=g, device=device)
    weights, ids = torch.softmax(logits, -1).topk(k, -1)
    return x, w_gate_up, w_down, weights, ids


def bench(models: list[str], tokens: tuple[int, ...], dtype: torch.dtype, iters: int) -> list[Result]:
    from splitserve.kernels.reference import fused_moe as loop_moe
    from splitserve.kernels.triton.fused_moe import fused_moe

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    results = []
    for name in models:
        e, k, h, i = MODELS[name]
        for t in tokens:
            args = inputs(t, e, k, h, i, dtype, device)
            fused, loop = fused_moe(*args), loop_moe(*args)
            err = (fused.float() - loop.float()).abs().max().item()
            out = loop.float().abs().max().item()
            fused_ms = time_ms(lambda: fused_moe(*args), iters, warmup=2, cuda=cuda)
            loop_ms = time_ms(lambda: loop_moe(*args), iters, warmup=2, cuda=cuda)
            used = args[4].unique().numel()
            weight_bytes = used * 3 * h * i * args[1].element_size()
            results.append(Result(
                model=name, tokens=t, dtype=str(dtype).removeprefix("torch."), fused_ms=fused_ms,
                loop_ms=loop_ms, speedup=loop_ms / fused_ms,
                fused_tflops=6 * t * k * h * i / fused_ms / 1e9, weight_gbps=weight_bytes / fused_ms / 1e6,
                max_abs_err=err, max_abs_out=out, correct=err <= TOLERANCE[dtype] * max(out, 1.0)))
            del args, fused, loop
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON record here")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (median); "
                   "default 20 on CUDA, 2 in the interpreter")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                   help="default: mixtral-8x7b and qwen3-30b-a3b on CUDA, tiny otherwise")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="batch sizes in tokens")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on CUDA, float32 otherwise")
    args = p.parse_args()
    import triton

    cuda = torch.cuda.is_available()
    models = args.models or (["mixtral-8x7b", "qwen3-30b-a3b"] if cuda else ["tiny"])
    tokens = tuple(args.tokens or (GPU_TOKENS if cuda else CPU_TOKENS))
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    iters = args.iters or (20 if cuda else 2)
    mode = "cuda" if cuda else "triton interpreter on CPU: correctness only, times are not speed"
    results = bench(models, tokens, dtype, iters)
    print(f"fused MoE kernel vs per-expert torch loop ({mode})")
    rows = [[r.model, r.tokens, r.dtype, r.fused_ms, r.loop_ms, f"{r.speedup:.2f}x",
             f"{r.fused_tflops:.2f}", f"{r.weight_gbps:.0f}", f"{r.max_abs_err:.2e} / {r.max_abs_out:.1f}",
             "ok" if r.correct else "WRONG"] for r in results]
    print(table(rows, ["model", "tokens", "dtype", "fused ms", "loop ms", "speedup", "TFLOP/s",
                       "weights GB/s", "max err / max out", "check"]))
    write_record(str(args.out) if args.out else None, "moe",
                 {"triton": triton.__version__, "mode": mode, "iters": iters,
                  "results": [asdict(r) for r in results]})
    if args.out:
        print(f"wrote {args.out}")
    return 0 if all(r.correct for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
