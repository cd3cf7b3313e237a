"""Multi-head latent attention: the KV cache per token, latent against
decompressed, and the decode step's time on this machine.

``--memory``: for DeepSeek-V3 (Kimi K2's shape too) and GLM-4.7-Flash, the
released model's shape (its transformers config class's defaults, read
through the engine's own ``ModelConfig.from_hf``): KV bytes per token in
bf16 as the engine caches it (the latent and k_pe, once:
``kv_lora_rank + qk_rope_head_dim`` per layer) beside the layout it replaced
(keys and values decompressed per head, both at the wider of the key and
value widths: ``2 * heads * max(qk_head_dim, v_head_dim)`` per layer), and
how many tokens a 64 GiB cache holds in each. Arithmetic only: no weights.

``--decode``: a small DeepSeek-V3 checkpoint with the released head widths
(16 heads; kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128,
v_head_dim 128; 4 layers of hidden 1024, 8 experts), written by transformers
with random weights, through ``LLMEngine`` on this machine: the median wall
time and CPU time (``time.process_time``: every thread of the process,
which other processes on a shared machine do not inflate) of one decode
step of a batch at each context length. ``--before TREE``
runs the same measurement on another source tree as well (e.g. an older
revision unpacked with ``git archive``), in a subprocess with that tree
first on ``PYTHONPATH``, alternating the two trees run by run.

    python benchmarks/bench_mla.py --memory --out bench-results/mla-memory.json
    python benchmarks/bench_mla.py --decode --before /tmp/before --out bench-results/mla-decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from splitserve.cluster.bench.record import record_header, write_json
from splitserve.cluster.bench.report import table
from splitserve.engine.config import ModelConfig

# name -> (transformers config class whose defaults are the released shape, architecture)
RELEASED = {"DeepSeek-V3 / Kimi K2": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
            "GLM-4.7-Flash": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM")}
CACHE_GIB = 64
BF16 = 2


def memory_rows() -> list[dict]:
    import transformers

    rows = []
    for name, (cls, arch) in RELEASED.items():
        raw = getattr(transformers, cls)().to_dict()
        raw["architectures"] = [arch]
        mc = ModelConfig.from_hf(raw, f"{cls}()")
        mla = mc.options.mla
        latent = mc.kv_bytes_per_token(torch.bfloat16)
        decompressed = 2 * mc.num_cache_layers * mc.num_heads * max(mla.qk_head_dim, mla.v_head_dim) * BF16
        rows.append({"model": name, "layers": mc.num_cache_layers, "heads": mc.num_heads,
                     "latent_width": mla.cache_head_dim, "kv_bytes_per_token": latent,
                     "decompressed_kv_bytes_per_token": decompressed, "ratio": decompressed / latent,
                     f"tokens_in_{CACHE_GIB}_GiB": CACHE_GIB * 2**30 // latent,
                     f"decompressed_tokens_in_{CACHE_GIB}_GiB": CACHE_GIB * 2**30 // decompressed})
    return rows


def write_checkpoint(out: Path) -> Path:
    """The small DeepSeek-V3 of ``--decode``, random weights, with a tokenizer."""
    import transformers

    from splitserve.engine.default_model import CORPUS_PATH, train_bpe_tokenizer, write_tokenizer_files

    cfg = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=384, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
        max_position_embeddings=8192, rope_scaling=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(str(out))
    write_tokenizer_files(out, train_bpe_tokenizer(CORPUS_PATH.read_text(encoding="utf-8"), 512))
    return out


def decode_step_s(path: str, context: int, batch: int, steps: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one decode step of ``batch`` sequences at ``context`` tokens."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    blocks = batch * (-(-(context + steps + 2) // 16)) + 16
    eng = LLMEngine(EngineConfig(model=path, num_blocks=blocks, block_size=16, max_num_seqs=batch,
                                 max_num_batched_tokens=max(context, 512), max_model_len=context + steps + 2))
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"r{i}", prompt_token_ids=[(7 * i + 3 * j) % 500 + 3 for j in range(context)],
                        params=params)
    while any(st.seq.num_output_tokens == 0 for st in eng.requests.values()):
        eng.step()  # the prompts, whole
    wall, cpu = [], []
    while eng.has_unfinished():
        t, c = time.perf_counter(), time.process_time()
        eng.step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _measure_in(tree: str | None, path: Path, context: int, batch: int, steps: int) -> tuple[float, float]:
    """``decode_step_s`` here (tree None) or in a subprocess on ``tree``'s sources."""
    if tree is None:
        return decode_step_s(str(path), context, batch, steps)
    env = {**os.environ, "PYTHONPATH": tree}
    # run from ``tree`` (its ``splitserve`` first on sys.path), this file loaded by its path
    code = ("import runpy; f = runpy.run_path(" + repr(str(Path(__file__).resolve())) + ")['decode_step_s']; "
            f"import splitserve; assert splitserve.__file__.startswith({tree!r}), splitserve.__file__; "
            f"print(f({str(path)!r}, {context}, {batch}, {steps}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True,
                         check=True)
    wall, cpu = out.stdout.strip().splitlines()[-1].strip("()").split(",")
    return float(wall), float(cpu)


def decode_rows(contexts: list[int], batch: int, steps: int, runs: int, before: str | None) -> list[dict]:
    trees = {"latent cache": None, **({"before": before} if before else {})}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "deepseek_v3_small")
        rows = []
        for c in contexts:
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
            for _ in range(runs):
                for name, tree in trees.items():
                    samples[name].append(_measure_in(tree, path, c, batch, steps))
            row = {"context": c, "batch": batch}
            for k, v in samples.items():
                row[f"{k} wall ms"] = [round(1000 * w, 2) for w, _ in v]
                row[f"{k} cpu ms"] = [round(1000 * u, 2) for _, u in v]
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", action="store_true", help="KV bytes per token of released shapes")
    ap.add_argument("--decode", action="store_true", help="decode step time of a small DeepSeek-V3")
    ap.add_argument("--before", help="another source tree to time the same way (its root directory)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", help="JSON record")
    args = ap.parse_args()
    rec = record_header("bench_mla")
    if args.memory:
        rec["memory"] = memory_rows()
        print(table([[r["model"], r["layers"], r["heads"], r["latent_width"], r["kv_bytes_per_token"] // 1024,
                      r["decompressed_kv_bytes_per_token"] // 1024, f'{r["ratio"]:.1f}x',
                      r[f"tokens_in_{CACHE_GIB}_GiB"], r[f"decompressed_tokens_in_{CACHE_GIB}_GiB"]]
                     for r in rec["memory"]],
                    ["model", "layers", "heads", "L", "KV KiB/token", "decompressed KiB/token", "saving",
                     f"tokens in {CACHE_GIB} GiB", "decompressed"]))
    if args.decode:
        rec["decode"] = decode_rows(args.contexts, args.batch, args.steps, args.runs, args.before)
        print(json.dumps(rec["decode"], indent=1))
    if args.out:
        write_json(args.out, rec)


if __name__ == "__main__":
    main()
