"""Hybrid models (recurrent layers beside attention) against all-attention
ones: memory per sequence, and the decode step's time as the context grows.

``--memory``: for each hybrid family, the released model's shape (its
transformers config class's defaults, read through the engine's own
``ModelConfig.from_hf``): KV bytes per token of its attention layers, its
recurrent states per sequence, and one sequence's whole cache at several
context lengths, beside the same model with every layer attending (the
attention layers' geometry on every layer). Arithmetic only: no weights.

``--decode``: a small Qwen3-Next checkpoint (2 of 8 layers attend) and an
all-attention twin of the same width and depth (Qwen3), written by
transformers with random weights, through ``LLMEngine`` on this machine: the time of one
decode step of a batch at each context length, three runs, alternating the
two models so both see the same load.

``--prefix``: the same hybrid checkpoint serving a conversation's second
turn (the first turn's prompt of each context length, its reply, and a new
message) with prefix caching (state checkpoints) and without
(``state_checkpoints: 0``): the second turn's time to its first token and
the prompt tokens it took from the cache, runs alternating the two.

    python benchmarks/bench_hybrid.py --memory --out bench-results/hybrid-memory.json
    python benchmarks/bench_hybrid.py --decode --contexts 256 1024 4096 --out bench-results/hybrid-decode.json
    python benchmarks/bench_hybrid.py --prefix --contexts 512 2048 --out bench-results/hybrid-prefix.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from splitserve.cluster.bench.record import record_header, write_json
from splitserve.cluster.bench.report import table
from splitserve.engine.config import ModelConfig

# family -> transformers config class whose defaults are the released model's shape
FAMILIES = {"qwen3_next": "Qwen3NextConfig", "qwen3_5": "Qwen3_5TextConfig",
            "qwen3_5_moe": "Qwen3_5MoeTextConfig", "kimi_linear": "KimiLinearConfig",
            "olmo_hybrid": "OlmoHybridConfig", "lfm2": "Lfm2Config", "granitemoehybrid": "GraniteMoeHybridConfig",
            "bamba": "BambaConfig", "nemotron_h": "NemotronHConfig"}
ARCHITECTURES = {"qwen3_next": "Qwen3NextForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM",
                 "qwen3_5_moe": "Qwen3_5MoeForCausalLM", "kimi_linear": "KimiLinearForCausalLM",
                 "olmo_hybrid": "OlmoHybridForCausalLM", "lfm2": "Lfm2ForCausalLM",
                 "granitemoehybrid": "GraniteMoeHybridForCausalLM", "bamba": "BambaForCausalLM",
                 "nemotron_h": "NemotronHForCausalLM"}
CONTEXTS = (4096, 32768, 131072)
BF16 = 2


def memory_rows() -> list[dict]:
    import transformers

    rows = []
    for family, cls in FAMILIES.items():
        if not hasattr(transformers, cls):
            continue
        raw = getattr(transformers, cls)().to_dict()
        raw["architectures"] = [ARCHITECTURES[family]]
        raw.setdefault("torch_dtype", "bfloat16")
        try:
            mc = ModelConfig.from_hf(raw, f"{cls}()")
        except Exception as e:  # noqa: BLE001 - a default shape this engine refuses: reported
            rows.append({"family": family, "error": str(e)})
            continue
        hybrid = mc.options.hybrid
        if hybrid is None:  # LFM2's config class defaults to attention in every layer
            rows.append({"family": family, "error": "its default config attends in every layer"})
            continue
        kv_token = mc.kv_bytes_per_token(torch.bfloat16)
        all_attention = kv_token * mc.num_layers // max(mc.num_cache_layers, 1)
        state = hybrid.state_bytes_per_sequence(BF16)
        row = {"family": family, "layers": mc.num_layers, "attention_layers": mc.num_cache_layers,
               "kv_bytes_per_token": kv_token, "state_bytes_per_sequence": state,
               "all_attention_kv_bytes_per_token": all_attention}
        for c in CONTEXTS:
            row[f"hybrid_MiB_at_{c}"] = (kv_token * c + state) / 2**20
            row[f"all_attention_MiB_at_{c}"] = all_attention * c / 2**20
        rows.append(row)
    return rows


def _checkpoint(root: Path, name: str, hybrid: bool) -> Path:
    """A random 8-layer model of hidden 256 (8 heads of 32, 2 KV heads, MLP 512):
    Qwen3-Next with attention on 2 of its layers, or Qwen3 (every layer attends)."""
    import transformers

    from splitserve.engine.default_model import CORPUS_PATH, train_bpe_tokenizer, write_tokenizer_files

    shape = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192)
    if hybrid:
        cfg = transformers.Qwen3NextConfig(
            **shape, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
            linear_value_head_dim=32, num_experts=0,
            layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(8)])
    else:
        cfg = transformers.Qwen3Config(**shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    out = root / name
    model.save_pretrained(str(out))
    write_tokenizer_files(out, train_bpe_tokenizer(CORPUS_PATH.read_text(encoding="utf-8"), 512))
    return out


def decode_step_s(path: Path, context: int, batch: int, steps: int) -> float:
    """Median seconds of one decode step of ``batch`` sequences at ``context`` tokens
    (``bench_mla.decode_step_s``, its wall-clock half)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_mla import decode_step_s as step_s

    return step_s(str(path), context, batch, steps)[0]


def decode_rows(contexts: list[int], batch: int, steps: int, runs: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = {"hybrid (2 of 8 layers attend)": _checkpoint(root, "hybrid", True),
                 "all attention": _checkpoint(root, "attention", False)}
        rows = []
        for c in contexts:
            samples: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(runs):
                for name, path in paths.items():
                    samples[name].append(decode_step_s(path, c, batch, steps))
            rows.append({"context": c, "batch": batch,
                         **{f"{k} ms": [round(1000 * s, 3) for s in v] for k, v in samples.items()}})
    return rows


def follow_up_ttft(path: Path, context: int, checkpoints: int | None) -> tuple[float, int]:
    """A first turn of ``context`` prompt tokens and an 8-token reply, then the
    second turn (that history and 64 new tokens): its seconds to the first
    token, and its prompt tokens taken from the prefix cache."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=str(path), block_size=16, max_num_seqs=4, kv_cache_memory_gb=0.25,
                                 max_num_batched_tokens=2048, state_checkpoints=checkpoints))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = [(7 * j + 3) % 500 + 3 for j in range(context)]
    reply = eng.generate([first], params)[0].token_ids
    second = first + reply + [(11 * j + 5) % 500 + 3 for j in range(64)]
    t = time.perf_counter()
    eng.add_request("turn2", prompt_token_ids=second, params=SamplingParams(max_tokens=1))
    cached = 0
    while eng.has_unfinished():
        for out in eng.step():
            cached = out.num_cached_tokens or cached
    return time.perf_counter() - t, cached


def prefix_rows(contexts: list[int], runs: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = _checkpoint(Path(tmp), "hybrid", True)
        rows = []
        for c in contexts:
            samples: dict[str, list[float]] = {"cached": [], "uncached": []}
            hit = 0
            for _ in range(runs):
                s, hit = follow_up_ttft(path, c, None)
                samples["cached"].append(s)
                samples["uncached"].append(follow_up_ttft(path, c, 0)[0])
            rows.append({"context": c, "second_turn_tokens": c + 8 + 64, "cached_tokens": hit,
                         **{f"{k} ttft ms": [round(1000 * s, 1) for s in v] for k, v in samples.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", action="store_true", help="memory per sequence of released shapes")
    ap.add_argument("--decode", action="store_true", help="decode step time against context length")
    ap.add_argument("--prefix", action="store_true",
                    help="a second turn's time to first token with and without prefix caching")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", help="JSON record")
    args = ap.parse_args()
    rec = record_header("bench_hybrid")
    if args.memory:
        rows = memory_rows()
        rec["memory"] = rows
        shown = [r for r in rows if "error" not in r]
        print(table([[r["family"], r["attention_layers"], r["layers"], r["kv_bytes_per_token"] // 1024,
                      r["state_bytes_per_sequence"] / 2**20,
                      *(f'{r[f"hybrid_MiB_at_{c}"]:.0f} / {r[f"all_attention_MiB_at_{c}"]:.0f}'
                        for c in CONTEXTS)] for r in shown],
                    ["family", "attn", "layers", "KV KiB/token", "state MiB/seq",
                     *(f"MiB at {c} (hybrid / all attention)" for c in CONTEXTS)]))
        for r in rows:
            if "error" in r:
                print(f"{r['family']}: {r['error']}")
    if args.decode:
        rec["decode"] = decode_rows(args.contexts, args.batch, args.steps, args.runs)
        print(json.dumps(rec["decode"], indent=1))
    if args.prefix:
        rec["prefix"] = prefix_rows(args.contexts, args.runs)
        print(json.dumps(rec["prefix"], indent=1))
    if args.out:
        write_json(args.out, rec)


if __name__ == "__main__":
    main()
