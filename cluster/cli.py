"""The ``splitserve`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="run the engine in this process on one or more prompts",
                       description="Generate completions with the engine in this process. "
                                   "Without --model, uses the embedded default model "
                                   "(random weights: its text is gibberish).")
    p.add_argument("prompts", nargs="*", default=None, help="prompt texts (default: a sample prompt)")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint directory")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: checkpoint's)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from engine.config import EngineConfig
    from engine.default_model import ensure_default_model
    from engine.errors import SplitserveError
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    model = args.model or str(ensure_default_model())
    prompts = args.prompts or ["The quick brown fox"]
    try:
        eng = LLMEngine(EngineConfig(model=model, device=args.device, dtype=args.dtype,
                                     kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size))
        if args.chat:  # the rendered template carries its own special tokens
            inputs = [eng.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        else:
            inputs = list(prompts)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        t0 = time.perf_counter()
        results = eng.generate(inputs, params)
        dt = time.perf_counter() - t0
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_out = sum(len(r.token_ids) for r in results)
    for p, r in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": p, "text": r.text, "token_ids": r.token_ids,
                              "finish_reason": r.finish_reason}))
        else:
            print(f"--- prompt: {p!r}\n{r.text}\n[finish_reason={r.finish_reason}, "
                  f"tokens={len(r.token_ids)}]")
    print(f"model={eng.model_id} device={eng.device} requests={len(results)} "
          f"output_tokens={n_out} time={dt:.3f}s tokens/s={n_out / dt:.1f}",
          file=sys.stderr if args.json else sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated LLM serving on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
