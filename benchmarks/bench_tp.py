"""Tensor parallelism on CPU: one engine at TP=2 against one at TP=1.

Builds a random-weight Llama of about 1B parameters at run time (hidden
2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, vocabulary
32000; no download), then for each degree starts an engine, and for each
of ``--runs`` passes times:

- a prefill step: one ``--prompt``-token prompt in one step;
- decode steps: ``--batch`` sequences decoding together, the mean of
  ``--decode-steps`` steps;

with the share of rank 0's step time spent in the forward's collectives
(embedding and per-block all-reduces, the logits gather; it includes
waiting for the slower rank). TP=1 runs with ``--threads`` intra-op
threads; each TP=2 rank with ``--threads / 2``, so both use the same cores.
Ranges over runs are reported (min-max). One degree runs at a time
(memory: the float32 model is ~4.4 GB, split in two at TP=2), or, with
``--alternate``, both engines stay loaded and their passes alternate, so
both see the same machine load.

    python benchmarks/bench_tp.py --out bench-results/tp-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from splitserve.cluster.bench.record import write_record

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
             num_kv_heads=8, vocab_size=32000)


def build_checkpoint(out: Path, layers: int) -> tuple[Path, int]:
    """A bf16 Llama checkpoint with random weights (the CPU engine computes in
    float32) in ``out``; returns (``out``, its parameter count)."""
    from splitserve.engine.default_model import (CORPUS_PATH, train_bpe_tokenizer,
                                                 write_tokenizer_files)

    s = {**SHAPE, "num_layers": layers}
    h, i, d = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_heads"]
    gen = torch.Generator().manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    w = {"model.embed_tokens.weight": normal(s["vocab_size"], h),
         "lm_head.weight": normal(s["vocab_size"], h),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for n in range(layers):
        p = f"model.layers.{n}"
        w.update({f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                  f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                  f"{p}.self_attn.q_proj.weight": normal(s["num_heads"] * d, h),
                  f"{p}.self_attn.k_proj.weight": normal(s["num_kv_heads"] * d, h),
                  f"{p}.self_attn.v_proj.weight": normal(s["num_kv_heads"] * d, h),
                  f"{p}.self_attn.o_proj.weight": normal(h, s["num_heads"] * d),
                  f"{p}.mlp.gate_proj.weight": normal(i, h),
                  f"{p}.mlp.up_proj.weight": normal(i, h),
                  f"{p}.mlp.down_proj.weight": normal(h, i)})
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    params = sum(t.numel() for t in w.values())
    del w
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": s["vocab_size"], "hidden_size": h, "intermediate_size": i,
              "num_hidden_layers": layers, "num_attention_heads": s["num_heads"],
              "num_key_value_heads": s["num_kv_heads"], "head_dim": d,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
              "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config))
    write_tokenizer_files(out, train_bpe_tokenizer(CORPUS_PATH.read_text(), 600))
    return out, params


def start(path: Path, tp: int, args):
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    torch.set_num_threads(max(1, args.threads // tp))  # the ranks take as many as rank 0
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig(model=str(path), tensor_parallel_size=tp, num_blocks=1024,
                                 block_size=16, max_num_batched_tokens=max(args.prompt, 512),
                                 enable_prefix_caching=False))
    return eng, {"startup_s": time.perf_counter() - t0, "threads_per_rank": torch.get_num_threads(),
                 "runs": []}


def run_once(eng, tp: int, run: int, args) -> dict:
    """One timed prefill step and the mean of ``--decode-steps`` decode steps."""
    from splitserve.engine.sampling_params import SamplingParams

    torch.set_num_threads(max(1, args.threads // tp))
    group = eng.runner.tp.group if eng.runner.tp is not None else None
    g = torch.Generator().manual_seed(run)
    comm0 = group.comm_s if group else 0.0
    prompt = torch.randint(2, SHAPE["vocab_size"], (args.prompt,), generator=g).tolist()
    eng.add_request(f"p{run}", prompt_token_ids=prompt,
                    params=SamplingParams(max_tokens=1, ignore_eos=True))
    t = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    prefill_s = time.perf_counter() - t
    prefill_comm = (group.comm_s - comm0) if group else 0.0
    for b in range(args.batch):
        ids = torch.randint(2, SHAPE["vocab_size"], (16,), generator=g).tolist()
        eng.add_request(f"d{run}-{b}", prompt_token_ids=ids, params=SamplingParams(
            max_tokens=args.decode_steps + 2, ignore_eos=True))
    eng.step()  # the batch's prompts
    comm0 = group.comm_s if group else 0.0
    t = time.perf_counter()
    for _ in range(args.decode_steps):
        eng.step()
    decode_s = (time.perf_counter() - t) / args.decode_steps
    decode_comm = ((group.comm_s - comm0) / args.decode_steps) if group else 0.0
    while eng.has_unfinished():
        eng.step()
    out = {"prefill_step_s": prefill_s, "prefill_comm_share": prefill_comm / prefill_s,
           "decode_step_s": decode_s, "decode_comm_share": decode_comm / decode_s}
    print(f"tp={tp} run {run}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()), flush=True)
    return out


def measure_all(path: Path, args) -> dict:
    """Both degrees: one after the other, or with ``--alternate`` both
    engines loaded and their passes alternated (both see the same load)."""
    results = {}
    if not args.alternate:
        for tp in (1, 2):
            eng, results[f"tp{tp}"] = start(path, tp, args)
            try:
                for run in range(args.runs):
                    results[f"tp{tp}"]["runs"].append(run_once(eng, tp, run, args))
            finally:
                eng.close()
        return results
    engines = {}
    try:
        for tp in (1, 2):
            engines[tp], results[f"tp{tp}"] = start(path, tp, args)
        for run in range(args.runs):
            for tp in (1, 2):
                results[f"tp{tp}"]["runs"].append(run_once(engines[tp], tp, run, args))
    finally:
        for eng in engines.values():
            eng.close()
    return results


def summary(runs: list[dict]) -> dict:
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=SHAPE["num_layers"],
                    help="fewer for a quick look (the record says how many ran)")
    ap.add_argument("--prompt", type=int, default=256, help="tokens of the timed prefill")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="intra-op threads of the TP=1 engine; split over the TP=2 ranks")
    ap.add_argument("--alternate", action="store_true",
                    help="load both engines and alternate their passes (needs memory for both)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    load = {"before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        path, params = build_checkpoint(Path(tmp), args.layers)
        results = measure_all(path, args)
        for tp in (1, 2):
            results[f"tp{tp}"]["summary"] = summary(results[f"tp{tp}"]["runs"])
    load["after"] = os.getloadavg()
    s1, s2 = results["tp1"]["summary"], results["tp2"]["summary"]
    results["tp2_over_tp1"] = {k: s2[k]["median"] / s1[k]["median"]
                               for k in ("prefill_step_s", "decode_step_s")}
    rec = write_record(args.out, "tp_cpu", {
        "shape": {**SHAPE, "num_layers": args.layers, "params": params}, "dtype": "float32",
        "prompt_tokens": args.prompt, "decode_batch": args.batch, "runs": args.runs,
        "alternated": args.alternate,
        "load_average": load, **results})
    print(json.dumps({k: rec["results"][k] for k in ("tp2_over_tp1", "load_average")}, indent=1))
    for tp in ("tp1", "tp2"):
        print(tp, json.dumps(rec["results"][tp]["summary"], indent=1))


if __name__ == "__main__":
    main()
