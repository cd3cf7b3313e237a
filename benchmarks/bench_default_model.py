"""Quality of the shipped default model pair: held-out perplexity, bf16 and FP8.

Each checkpoint (``default_model_path()``, ``default_draft_path()``) scores
``engine/default_model/heldout.txt`` (documents kept out of its training)
through the engine's own prompt-scoring path, the one ``splitserve profile``
records as quality rows (``splitserve.cluster.planning.profiler.perplexity``:
windows of up to 1024 tokens, ``prompt_logprobs``), four ways:

- bf16 weights as shipped (on the CPU the engine computes in float32);
- ``weight_dtype: fp8`` (projections in e4m3, one scale per output channel);
- ``kv_cache_dtype: fp8``;
- both.

The relative increase is each variant's perplexity over the bf16 one of the
same checkpoint. A sample completion of each checkpoint (greedy, bf16) is
kept in the record too.

    PYTHONPATH=$PWD python -m benchmarks.bench_default_model --out bench-results/default-model.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from splitserve.cluster.bench.record import write_record
from splitserve.cluster.bench.report import table

VARIANTS = {  # name -> EngineConfig overrides
    "bf16 weights": {},
    "fp8 weights": {"weight_dtype": "fp8"},
    "fp8 KV cache": {"kv_cache_dtype": "fp8"},
    "fp8 weights + fp8 KV": {"weight_dtype": "fp8", "kv_cache_dtype": "fp8"},
}
SAMPLES = ("def read_config(path):\n", "The quick brown fox")


def engine(path: Path, device: str, **overrides):
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(path), device=device, num_blocks=512, block_size=16,
                                  max_num_seqs=8, max_model_len=1025,
                                  enable_prefix_caching=False, **overrides))


def score(path: Path, device: str, max_tokens: int | None) -> list[dict]:
    from splitserve.cluster.planning.profiler import perplexity
    from splitserve.engine.default_model import HELDOUT_PATH

    text = HELDOUT_PATH.read_text(encoding="utf-8")
    rows = []
    for name, kw in VARIANTS.items():
        t0 = time.perf_counter()
        ppl, n = perplexity(engine(path, device, **kw), text, max_tokens)
        rows.append({"variant": name, "tokens": n, "perplexity": ppl,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  {path.name} {name}: perplexity {ppl:.3f} over {n} tokens", flush=True)
    for row in rows:
        row["relative_increase"] = row["perplexity"] / rows[0]["perplexity"] - 1
    return rows


def samples(path: Path, device: str) -> list[dict]:
    from splitserve.engine.sampling_params import SamplingParams

    eng = engine(path, device)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    return [{"prompt": p, "completion": r.text} for p, r in zip(SAMPLES, eng.generate(list(SAMPLES), params))]


def main() -> None:
    from splitserve.engine.default_model import default_draft_path, default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"device": args.device, "threads": args.threads, "models": {}}
    for path in (default_model_path(), default_draft_path()):
        print(path.name, flush=True)
        results["models"][path.name] = {"perplexity": score(path, args.device, args.max_tokens),
                                        "samples": samples(path, args.device)}
    rows = [[m, r["variant"], r["tokens"], f"{r['perplexity']:.3f}", f"{100 * r['relative_increase']:+.2f}%"]
            for m, v in results["models"].items() for r in v["perplexity"]]
    print(table(rows, ["checkpoint", "variant", "tokens", "perplexity", "vs bf16"]))
    if args.out:
        write_record(args.out, "bench_default_model", results)


if __name__ == "__main__":
    main()
