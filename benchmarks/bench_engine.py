"""Engine throughput versus transformers ``generate`` on the same CPU/GPU.

Builds a random-weight Llama of ~50-100M parameters (no download), then
runs greedy generation of the same requests through (a) transformers
``generate`` and (b) splitserve's engine, alternating passes so both see the
same machine load, and prints output-token throughput ratios: batch 1; N
concurrent requests of equal lengths (transformers' best case: one static
batch with no padding); and N concurrent requests of varied prompt and
output lengths (a serving workload: transformers pads and runs each static
batch to its longest output, the engine batches continuously).

Beside the ratios it prints the roofline: the matmul FLOPs each workload
needs (each request's own tokens only: linear layers, the vocabulary
projection once per output token, attention over the context), the rate
each side reached, that rate as a fraction of this device's large-matmul
peak measured in the same run, and the compute ceiling: the ratio to transformers
an engine reaching the peak would have.

    python benchmarks/bench_engine.py --out bench-results/engine.json
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_engine_roofline import matmul_peak
from splitserve.cluster.bench.record import write_record
from splitserve.cluster.bench.report import table

SHAPES = {
    # ~60M parameters with vocab 32000
    "llama-60m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


def build_checkpoint(out: Path, shape: str, dtype: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from splitserve.engine.default_model import train_bpe_tokenizer, write_tokenizer_files

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, torch_dtype=dtype, **SHAPES[shape])
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    text = (Path(__file__).resolve().parents[1] / "engine" / "default_corpus.txt").read_text()
    write_tokenizer_files(out, train_bpe_tokenizer(text, 1000))
    return out


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1000, vocab, (length,), generator=g).tolist() for _ in range(n)]


def workload_flops(shape: str, ps: list[list[int]], max_new) -> float:
    """Matmul FLOPs of serving ``ps`` with these output lengths, padding-free:
    every prompt token and every fed-back output token through each layer's
    projections and MLP, the vocabulary projection for each output token,
    and QK^T + PV over the tokens before it."""
    s = SHAPES[shape]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    per_token = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    outs = max_new if isinstance(max_new, list) else [max_new] * len(ps)
    total = 0.0
    for p, n_out in zip(ps, outs):
        fed = len(p) + n_out - 1
        total += per_token * fed + 2 * h * s["vocab_size"] * n_out
        total += 4 * layers * h * fed * (fed + 1) / 2  # position t attends to t+1 tokens
    return total


def hf_runner(path: Path, device: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32 if device == "cpu"
                                             else None).to(device).eval()

    def run(ps: list[list[int]], max_new, batch: int) -> tuple[float, int]:
        """Static batches of ``batch`` requests, left-padded; a batch runs until
        its longest output is done. Counts only each request's own tokens."""
        outs = max_new if isinstance(max_new, list) else [max_new] * len(ps)
        n_out = 0
        t0 = time.perf_counter()
        for i in range(0, len(ps), batch):
            chunk, want = ps[i:i + batch], outs[i:i + batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                                device=device)
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=max(want),
                               min_new_tokens=max(want), do_sample=False, pad_token_id=0)
            n_out += sum(want)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, n_out
    return run


def engine_runner(path: Path, device: str, max_batch: int):
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=str(path), device=device, max_num_seqs=max_batch,
                                 num_blocks=4096, block_size=16, max_num_batched_tokens=4096,
                                 enable_prefix_caching=False))

    def run(ps: list[list[int]], max_new, batch: int) -> tuple[float, int]:
        outs = max_new if isinstance(max_new, list) else [max_new] * len(ps)
        sps = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in outs]
        # all requests arrive together; at most ``batch`` run at once and a
        # finished one is replaced by the next at the following step
        eng.scheduler.max_num_seqs = batch
        t0 = time.perf_counter()
        n_out = sum(len(r.token_ids) for r in eng.generate(ps, sps))
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, n_out
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-60m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="best of this many alternating passes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / "ckpt", args.shape, args.dtype)
        vocab = SHAPES[args.shape]["vocab_size"]
        hf = hf_runner(path, args.device)
        en = engine_runner(path, args.device, args.concurrency)
        warm = prompts(1, args.prompt_len, vocab, seed=99)
        hf(warm, 2, 1)
        en(warm, 2, 1)
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        peak = matmul_peak(device, dtype, 2048, 3)
        rows, results, measured = [], {}, []
        rng = random.Random(0)
        n = args.requests
        varied = [[rng.randrange(1000, vocab) for _ in range(rng.randint(8, 2 * args.prompt_len))]
                  for _ in range(n)]
        varied_out = [rng.randint(4, 2 * args.max_new) for _ in range(n)]
        c = args.concurrency
        workloads = (
            ("batch 1", 1, prompts(4, args.prompt_len, vocab), args.max_new),
            (f"{c} concurrent, equal lengths", c, prompts(n, args.prompt_len, vocab), args.max_new),
            (f"{c} concurrent, varied lengths", c, varied, varied_out),
        )
        for label, batch, ps, outs in workloads:
            best_hf = best_en = 0.0
            for _ in range(args.reps):  # alternate so both see the same machine load
                t, k = hf(ps, outs, batch)
                best_hf = max(best_hf, k / t)
                t, k = en(ps, outs, batch)
                best_en = max(best_en, k / t)
            # FLOPs per output token: the workload's FLOPs spread over its output
            per_tok = workload_flops(args.shape, ps, outs) / sum(
                outs if isinstance(outs, list) else [outs] * len(ps))
            measured.append((label, best_hf, best_en, per_tok, len(ps), batch))
        peak = max(peak, matmul_peak(device, dtype, 2048, 3))
    for label, best_hf, best_en, per_tok, n_req, batch in measured:
        roof = [best_hf * per_tok / peak, best_en * per_tok / peak]
        rows.append([label, best_hf, best_en, best_en / best_hf, *roof, 1 / roof[0]])
        results[label] = {"transformers_tok_s": best_hf, "engine_tok_s": best_en,
                          "ratio": best_en / best_hf, "requests": n_req, "batch": batch,
                          "flops_per_output_token": per_tok,
                          "transformers_fraction_of_peak": roof[0],
                          "engine_fraction_of_peak": roof[1], "compute_ceiling_ratio": 1 / roof[0]}
    print(f"{args.dtype} matmul peak (2048^3, best of the start and the end): {peak / 1e9:.1f} GFLOP/s")
    print(table(rows, ["workload", "transformers tok/s", "splitserve tok/s", "ratio",
                       "transformers/peak", "splitserve/peak", "compute ceiling"]))
    print("targets: ratio >= 1.0 at batch 1, >= 3.0 at 16 concurrent requests\n"
          "(transformers runs each group of concurrent requests as one left-padded static batch\n"
          " until its longest output; only each request's own output tokens are counted)")
    print("(x/peak: the workload's matmul FLOP/s as a fraction of the peak; compute ceiling:\n"
          " peak / transformers' rate, the most any engine doing these FLOPs could reach here)")
    write_record(args.out, "engine", {"shape": args.shape, "device": args.device,
                                      "matmul_peak_gflops": peak / 1e9, **results,
                                      "args": vars(args)})


if __name__ == "__main__":
    main()
