"""Whole-engine steps against the hardware's limits, with transformers beside.

Measures in one run: device copy bandwidth and large-matmul peak; then the
engine's decode step (batch B, context C) against the lower bound
(weight bytes + KV bytes) / bandwidth, and a prefill of T tokens against
FLOPs / peak (2 x non-embedding params x T + 2 x layers x d_model x T^2);
and the same steps through transformers on the same device. Random weights
of a Llama shape are built in memory (no checkpoint files).

    python benchmarks/bench_engine_roofline.py --shape llama-3.1-8b --out bench-results/roofline-h100.json
    python benchmarks/bench_engine_roofline.py --device cpu --shape tiny   # code-path check only

Targets on H100/H200 (bf16): decode at batch 1 within 1.2x of its bound, at
batch 64 with 2k context within 1.3x; prefill of 2k tokens >= 60% of peak.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from splitserve.cluster.bench.record import write_record
from splitserve.cluster.bench.report import table
from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.models import build_model

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, vocab_size=128256),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                 num_kv_heads=2, vocab_size=1024),
}


def model_config(shape: str) -> ModelConfig:
    s = SHAPES[shape]
    return ModelConfig(
        architecture="LlamaForCausalLM", family="llama", vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_layers=s["num_layers"], num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"],
        head_dim=s["hidden_size"] // s["num_heads"], rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position=8192, tie_word_embeddings=False, attention_bias=False, qk_norm=False,
        dtype="bfloat16")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    fn()
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device, nbytes: int, reps: int) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / timed(lambda: b.copy_(a), device, reps)  # read + write


def matmul_peak(device, dtype, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, reps)


def random_model(cfg: ModelConfig, dtype, device):
    model = build_model(cfg, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in list(model.parameters()) + [b for b in model.buffers() if b.dtype == dtype]:
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(dtype))
    return model


def decode_inputs(cfg, batch, ctx, block_size, device):
    blocks_per_seq = -(-(ctx + 1) // block_size)
    tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32,
                          device=device).view(batch, blocks_per_seq)
    pos = torch.full((batch,), ctx, dtype=torch.int64, device=device)
    slots = (tables[:, ctx // block_size].long() * block_size + ctx % block_size)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                             cu_query_lens=torch.arange(batch + 1, dtype=torch.int32, device=device),
                             context_lens=torch.full((batch,), ctx + 1, dtype=torch.int32,
                                                     device=device), decode_only=True)
    ids = torch.randint(0, cfg.vocab_size, (batch,), device=device)
    return ids, pos, meta, batch * blocks_per_seq


def prefill_inputs(cfg, tokens, block_size, device):
    nblk = -(-tokens // block_size)
    tables = torch.arange(nblk, dtype=torch.int32, device=device).view(1, nblk)
    meta = AttentionMetadata(slot_mapping=torch.arange(tokens, device=device), block_tables=tables,
                             cu_query_lens=torch.tensor([0, tokens], dtype=torch.int32, device=device),
                             context_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
                             decode_only=False)
    ids = torch.randint(0, cfg.vocab_size, (tokens,), device=device)
    return ids, torch.arange(tokens, device=device), meta, nblk


def kv_cache(cfg, nblocks, block_size, dtype, device):
    return torch.zeros(cfg.num_cache_layers, 2, nblocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                       dtype=dtype, device=device)


def hf_model(cfg: ModelConfig, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position, rope_theta=cfg.rope_theta))
    return hf.to(device=device, dtype=dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--decode", default="1x2048,64x2048", help="BATCHxCONTEXT list")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers columns")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and args.shape != "tiny":
        raise SystemExit("on CPU only --shape tiny is supported (a code-path check); "
                         "run the real shapes on a GPU")
    cfg = model_config(args.shape)
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20), args.reps)
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 512, args.reps)
    model = random_model(cfg, dtype, device)
    elem = torch.empty((), dtype=dtype).element_size()
    params = sum(p.numel() for p in model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    weight_bytes = (params - embed) * elem + cfg.hidden_size * elem  # lm_head read, one embedding row
    hf = None if args.no_hf else hf_model(cfg, dtype, device)
    rows, results = [], {"copy_bandwidth_gb_s": bw / 1e9, "matmul_peak_tflops": peak / 1e12}
    with torch.inference_mode():
        for spec in args.decode.split(","):
            batch, ctx = (int(x) for x in spec.split("x"))
            ids, pos, meta, nblk = decode_inputs(cfg, batch, ctx, args.block_size, device)
            cache = kv_cache(cfg, nblk, args.block_size, dtype, device)
            t = timed(lambda: model.compute_logits(model(ids, pos, cache, meta)), device, args.reps)
            kv_bytes = batch * (ctx + 1) * cfg.kv_bytes_per_token(dtype)
            bound = (weight_bytes + kv_bytes) / bw
            r = {"step_s": t, "bound_s": bound, "ratio_to_bound": t / bound}
            if hf is not None:
                from transformers import DynamicCache

                past = DynamicCache()
                hf(torch.randint(0, cfg.vocab_size, (batch, ctx), device=device),
                   past_key_values=past, use_cache=True)
                step_ids = ids.view(batch, 1)

                def hf_step():  # one token on top of ctx, then drop it again
                    hf(step_ids, past_key_values=past, use_cache=True)
                    past.crop(-1)
                r["transformers_step_s"] = timed(hf_step, device, args.reps)
                del past
            results[f"decode {batch}x{ctx}"] = r
            rows.append([f"decode b={batch} ctx={ctx}", t * 1e3, bound * 1e3, t / bound,
                         r.get("transformers_step_s", float("nan")) * 1e3])
            del cache
        T = args.prefill_tokens if device.type == "cuda" else 256
        ids, pos, meta, nblk = prefill_inputs(cfg, T, args.block_size, device)
        cache = kv_cache(cfg, nblk, args.block_size, dtype, device)
        t = timed(lambda: model(ids, pos, cache, meta), device, args.reps)
        flops = 2 * (params - embed) * T + 2 * cfg.num_layers * cfg.hidden_size * T * T
        bound = flops / peak
        r = {"step_s": t, "bound_s": bound, "fraction_of_peak": bound / t}
        if hf is not None:
            x = ids.view(1, T)
            r["transformers_step_s"] = timed(lambda: hf.model(x), device, args.reps)
        results[f"prefill {T}"] = r
        rows.append([f"prefill T={T}", t * 1e3, bound * 1e3, t / bound,
                     r.get("transformers_step_s", float("nan")) * 1e3])
    print(f"shape={args.shape} device={device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}) "
          f"dtype={args.dtype} copy bandwidth={bw / 1e9:.1f} GB/s, matmul peak={peak / 1e12:.1f} TFLOP/s")
    print(table(rows, ["step", "splitserve ms", "bound ms", "splitserve / bound", "transformers ms"]))
    print("targets (GPU): decode b=1 <= 1.2x bound, b=64 ctx=2k <= 1.3x, prefill 2k >= 60% of peak "
          "(bound / time >= 0.6)")
    write_record(args.out, "engine_roofline", {"shape": args.shape, "device": str(device), **results})


if __name__ == "__main__":
    main()
