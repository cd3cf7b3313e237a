"""Engine throughput versus transformers ``generate`` on the same CPU/GPU.

Builds a random-weight Llama of ~50-100M parameters (no download), then
runs greedy generation of the same prompts at batch 1 and with N concurrent
requests through (a) transformers ``generate`` and (b) splitserve's engine,
side by side in one run, and prints output-token throughput ratios.

    python benchmarks/bench_engine.py --out bench-results/engine.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import table, write_record

SHAPES = {
    # ~60M parameters with vocab 32000
    "llama-60m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


def build_checkpoint(out: Path, shape: str, dtype: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.default_model import train_bpe_tokenizer, write_tokenizer_files

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


def run_hf(path: Path, ps: list[list[int]], max_new: int, batch: int, device: str) -> tuple[float, int]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32 if device == "cpu"
                                             else None).to(device).eval()
    n_out = 0
    model.generate(torch.tensor([ps[0]], device=device), max_new_tokens=2, do_sample=False)
    t0 = time.perf_counter()
    for i in range(0, len(ps), batch):
        chunk = ps[i:i + batch]  # equal lengths: no padding needed
        ids = torch.tensor(chunk, device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, pad_token_id=0)
        n_out += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n_out


def run_engine(path: Path, ps: list[list[int]], max_new: int, batch: int, device: str) -> tuple[float, int]:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=str(path), device=device, max_num_seqs=batch,
                                 num_blocks=4096, block_size=16, max_num_batched_tokens=4096))
    sp = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    eng.generate([ps[0]], SamplingParams(max_tokens=2, temperature=0.0))
    t0 = time.perf_counter()
    n_out = 0
    for i in range(0, len(ps), batch):
        res = eng.generate(ps[i:i + batch], sp)
        n_out += sum(len(r.token_ids) for r in res)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-60m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / "ckpt", args.shape, args.dtype)
        vocab = SHAPES[args.shape]["vocab_size"]
        rows, results = [], {}
        for label, batch, n in (("batch 1", 1, max(2, args.requests // 8)),
                                (f"{args.concurrency} concurrent", args.concurrency, args.requests)):
            ps = prompts(n, args.prompt_len, vocab)
            hf_t, hf_n = run_hf(path, ps, args.max_new, batch, args.device)
            en_t, en_n = run_engine(path, ps, args.max_new, batch, args.device)
            hf_tps, en_tps = hf_n / hf_t, en_n / en_t
            rows.append([label, hf_tps, en_tps, en_tps / hf_tps])
            results[label] = {"transformers_tok_s": hf_tps, "engine_tok_s": en_tps,
                              "ratio": en_tps / hf_tps, "requests": n, "batch": batch}
    params = sum(v for k, v in SHAPES[args.shape].items() if k != "vocab_size")
    print(f"shape={args.shape} device={args.device} prompt_len={args.prompt_len} "
          f"max_new={args.max_new}")
    print(table(rows, ["workload", "transformers tok/s", "splitserve tok/s", "ratio"]))
    print("targets: ratio >= 1.0 at batch 1, >= 3.0 at 16 concurrent")
    write_record(args.out, "engine", {"shape": args.shape, "device": args.device, **results,
                                      "args": vars(args), "_shape_sum": params})


if __name__ == "__main__":
    main()
