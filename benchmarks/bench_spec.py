"""Speculative decoding against plain decoding: output tokens/s at batch 1,
8 and 32, on two workloads, in one run, passes alternated ``--runs`` times.

  copy (n-gram prompt lookup): a code-editing shape, where the output
      mostly repeats the prompt. The default model is small and copies
      little on its own, so the prompts are built from its own output: prompt = prefix + (its greedy continuation of prefix) +
      separator + prefix. Where the model then writes the same continuation
      again, prompt lookup finds it in the prompt, as it finds the unchanged
      lines of a file being edited. The model's output repeats the body
      only in part (about 65% of its tokens are found by prompt lookup).
  rewrite (n-gram prompt lookup): the copy shape with its body refined
      (``spec_probe.copy_prompts`` with ``--rewrite-rounds``) until the model's
      output repeats it as a rewrite of a shown file repeats the file: the
      output mostly copies the prompt (about 85% of its tokens found by
      prompt lookup), the code-editing workload of the 2x target.
  free (draft model): greedy free generation from corpus prefixes, drafted
      by (a) the model's first layer (a compatible checkpoint cut from the
      same weights), (b) the shipped draft (``default_draft_path()``: a
      separately trained 2-layer model with the same tokenizer) and
      (c) the model itself (acceptance 100%: the upper bound of what any
      draft could give, at a draft cost equal to the target's).

Three cases repeat with the adaptive rule off (``fixed k``): n-gram, to
show what verifying costs, the shipped draft, to show what it yields when
it is never switched off, and draft = target, to show the mechanism at
100% acceptance at every batch size.

``splitserve profile --spec-import`` reads the fixed-k n-gram and
shipped-draft cases of its record into the profile database.

For each case it reports tokens/s of plain and speculative decoding, their
ratio (per pass, the range over passes), the acceptance rate, the mean
accepted length and the draft time share; outputs are checked to be equal
(greedy). The adaptive length rule runs as deployed (the device's step curve;
``--saturation-tokens`` sets a knee in its place; ``--fixed`` verifies the full length every step in
every case).

    python -m benchmarks.bench_spec --out bench-results/spec-cpu.json
    python -m benchmarks.bench_spec --step-costs --batches 1 2 8 32
    python -m benchmarks.bench_spec --device cuda --out gpu-results/spec.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from splitserve.cluster.bench.record import record_header, write_json
from splitserve.cluster.bench.report import table

BATCHES = (1, 8, 32)


def first_layers_checkpoint(src: Path, out: Path, layers: int) -> Path:
    """A copy of ``src`` keeping its first ``layers`` decoder layers (same
    embeddings, final norm, head and tokenizer): a draft model."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(cfg))
    keep = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def engine(path: Path, device: str, spec=None):
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(path), device=device, num_blocks=4096, block_size=16,
                                  max_num_seqs=max(BATCHES), max_num_batched_tokens=4096,
                                  enable_prefix_caching=False, speculative=spec))


def corpus_prefixes(tokenizer, n: int, length: int) -> list[list[int]]:
    # the default model's held-out text: its own domain (Python code and docs),
    # never seen in training
    from splitserve.cluster.planning import spec_probe
    from splitserve.engine.default_model import HELDOUT_PATH

    return spec_probe.corpus_prefixes(tokenizer, HELDOUT_PATH.read_text(encoding="utf-8"), n,
                                      length)


def copy_prompts(plain, n: int, prefix_len: int, body_len: int,
                 rounds: int = 0) -> list[list[int]]:
    # the code-edit workload of `splitserve profile --speculation` (spec_probe)
    from splitserve.cluster.planning import spec_probe

    return spec_probe.copy_prompts(plain, corpus_prefixes(plain.tokenizer, n, prefix_len),
                                   body_len, rounds)


def copy_fraction(prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """The share of the outputs' tokens that prompt lookup predicts."""
    from splitserve.cluster.planning.spec_probe import copy_fraction as one

    return statistics.mean(one(p, o) for p, o in zip(prompts, outputs))


def timed(eng, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    from splitserve.engine.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    res = eng.generate(prompts, sp)
    dt = time.perf_counter() - t0
    return sum(len(r.token_ids) for r in res) / dt, [r.token_ids for r in res]


def step_costs(path: Path, device: str, batches: list[int], ks: list[int],
               reps: int) -> list[dict]:
    """The time of one verify forward of ``k`` drafts per sequence relative
    to a plain decode forward, at each batch size: the curve the adaptive
    rule's step curve (``engine.spec.adaptive.STEP_CURVES``) stands for. Each sequence holds a
    100-token context; the forwards alternate, ``reps`` rounds; medians
    and minima of the per-forward times."""
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.engine.scheduler import ScheduledSeq

    out = []
    for b in batches:
        eng = engine(path, device)
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        for i in range(b):
            eng.add_request(None, prompt_token_ids=[(7 * j + i) % 500 + 3 for j in range(100)],
                            params=sp)
        eng.step()  # prefilled: each sequence one token behind
        seqs = [st.seq for st in eng.requests.values()]
        for s in seqs:  # room for the drafts' KV (rewritten by every forward)
            if not eng.kv.allocate_more(s, 1 + max(ks)):
                raise SystemExit("no KV blocks for the step-cost drafts")
        times: dict[int, list[float]] = {k: [] for k in [0, *ks]}
        for _ in range(reps + 3):
            for k in times:
                sched = [ScheduledSeq(s, 1 + k, list(range(20, 20 + k))) for s in seqs]
                t0 = time.perf_counter()
                eng.runner.execute(sched, eng.kv)
                times[k].append(time.perf_counter() - t0)
        times = {k: v[3:] for k, v in times.items()}  # the first rounds warm up
        med0, min0 = statistics.median(times[0]), min(times[0])
        for k in ks:
            out.append({"batch": b, "k": k, "plain_forward_ms": med0 * 1e3,
                        "cost_median": statistics.median(times[k]) / med0,
                        "cost_min": min(times[k]) / min0})
        print(f"step cost, batch {b}: plain forward {med0 * 1e3:.2f} ms; " + ", ".join(
            f"k={r['k']} {r['cost_median']:.2f} (min {r['cost_min']:.2f})"
            for r in out if r["batch"] == b), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--saturation-tokens", type=int, default=None,
                    help="a knee for the adaptive rule's step cost (default: the device's curve)")
    ap.add_argument("--fixed", action="store_true", help="no adaptive length")
    ap.add_argument("--rewrite-rounds", type=int, default=4,
                    help="refinements of the rewrite workload's body (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared machine, OpenMP barriers between "
                         "two threads stall far more than they gain)")
    ap.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                    help="run only these cases, by name (default: all)")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES),
                    help="batch sizes (default: %(default)s)")
    ap.add_argument("--step-costs", action="store_true",
                    help="only measure verify-forward cost against plain, by batch and k")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    from splitserve.engine.default_model import default_draft_path, default_model_path
    from splitserve.engine.spec.config import SpeculativeConfig

    torch.manual_seed(0)
    target = default_model_path()
    if args.step_costs:
        costs = step_costs(target, args.device, args.batches, [1, 2, 4, 6, 8, 12], 30)
        if args.out:
            write_json(args.out, {**record_header("spec-step-costs"), "settings": vars(args),
                                  "step_costs": costs})
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    try:
        draft1 = first_layers_checkpoint(target, tmp / "draft-1-layer", 1)
        common = dict(num_speculative_tokens=args.k, adaptive=not args.fixed,
                      saturation_tokens=args.saturation_tokens)
        plain = engine(target, args.device)
        cases = {  # name -> (workload, speculative config)
            "copy / ngram": ("copy", SpeculativeConfig(method="ngram", ngram_max=4, **common)),
            "free / draft 1 layer": ("free", SpeculativeConfig(
                method="draft", draft_model=str(draft1), **common)),
            "free / shipped draft": ("free", SpeculativeConfig(
                method="draft", draft_model=str(default_draft_path()), **common)),
            "free / shipped draft, fixed k": ("free", SpeculativeConfig(
                method="draft", draft_model=str(default_draft_path()),
                **{**common, "adaptive": False})),
            "free / draft = target": ("free", SpeculativeConfig(
                method="draft", draft_model=str(target), **common)),
            # the full length every step: what verification costs when it is not
            # switched off (n-gram, where the model does not repeat) and what the
            # mechanism yields at 100% acceptance (draft = target)
            "copy / ngram, fixed k": ("copy", SpeculativeConfig(
                method="ngram", ngram_max=4, **{**common, "adaptive": False})),
            # a longer length for a batch of one (on a CPU the rule's step curve,
            # engine.spec.adaptive.STEP_CURVES, lets it verify 8): prompt lookup's drafts
            # come in runs, copied whole or missed at once, so the longer
            # lengths keep paying where the geometric model says they stop
            "copy / ngram, k = 8": ("copy", SpeculativeConfig(
                method="ngram", ngram_max=4, **{**common, "num_speculative_tokens": 8})),
            # the same on the rewrite workload, where the output mostly copies the prompt
            "rewrite / ngram": ("rewrite", SpeculativeConfig(method="ngram", ngram_max=4, **common)),
            "rewrite / ngram, fixed k": ("rewrite", SpeculativeConfig(
                method="ngram", ngram_max=4, **{**common, "adaptive": False})),
            "rewrite / ngram, k = 8": ("rewrite", SpeculativeConfig(
                method="ngram", ngram_max=4, **{**common, "num_speculative_tokens": 8})),
            # prompt lookup where the output does not copy the prompt: what the
            # rule costs when its drafts are rarely accepted
            "free / ngram, k = 8": ("free", SpeculativeConfig(
                method="ngram", ngram_max=4, **{**common, "num_speculative_tokens": 8})),
            "free / draft = target, fixed k": ("free", SpeculativeConfig(
                method="draft", draft_model=str(target), **{**common, "adaptive": False})),
        }
        if args.cases:
            unknown = set(args.cases) - set(cases)
            if unknown:
                raise SystemExit(f"unknown cases {sorted(unknown)}; known: {sorted(cases)}")
            cases = {name: c for name, c in cases.items() if name in args.cases}
        engines = {name: engine(target, args.device, spec) for name, (_, spec) in cases.items()}
        batches = args.batches
        workloads = {b: {"copy": copy_prompts(plain, b, 24, args.new_tokens + 8),
                         "rewrite": copy_prompts(plain, b, 24, args.new_tokens + 8,
                                                 args.rewrite_rounds),
                         "free": corpus_prefixes(plain.tokenizer, b, 24)} for b in batches}
        for b in batches:  # warm-up: allocator, first-call paths
            timed(plain, workloads[b]["free"][:1], 4)
        results = []
        for name, (wl, _) in cases.items():
            eng = engines[name]
            for b in batches:
                ps = workloads[b][wl]
                c0 = eng.load_stats()
                plain_tps, spec_tps = [], []
                for _ in range(args.runs):  # alternated: both see the same machine load
                    tp, want = timed(plain, ps, args.new_tokens)
                    ts, got = timed(eng, ps, args.new_tokens)
                    if got != want:
                        raise SystemExit(f"{name}, batch {b}: speculative output differs")
                    plain_tps.append(tp)
                    spec_tps.append(ts)
                c1 = eng.load_stats()
                drafts = c1.spec_drafts - c0.spec_drafts
                proposed = c1.spec_draft_tokens - c0.spec_draft_tokens
                accepted = c1.spec_accepted_tokens - c0.spec_accepted_tokens
                busy = c1.busy_time_s - c0.busy_time_s
                ratios = [s / p for s, p in zip(spec_tps, plain_tps)]
                results.append({
                    "case": name, "batch": b,
                    "plain_tokens_per_s": statistics.median(plain_tps),
                    "spec_tokens_per_s": statistics.median(spec_tps),
                    "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios), "ratio_max": max(ratios),
                    "acceptance_rate": accepted / proposed if proposed else 0.0,
                    "mean_accepted_length": 1 + accepted / drafts if drafts else 0.0,
                    "draft_tokens": proposed,
                    "draft_time_share": (c1.spec_draft_time_s - c0.spec_draft_time_s) / busy
                    if busy else 0.0,
                    "last_speculation_length": eng.spec.last_k,
                    "step_curve": vars(eng.spec.curve),
                    "draft_cost_ratio": eng.spec.tracker.draft_ratio,
                    "copy_fraction": copy_fraction(ps, want),
                })
                r = results[-1]
                print(f"{name:24s} batch {b:3d}: plain {r['plain_tokens_per_s']:8.1f} tok/s, "
                      f"spec {r['spec_tokens_per_s']:8.1f} tok/s, ratio {r['ratio_median']:.2f} "
                      f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}], acceptance "
                      f"{r['acceptance_rate']:.2f}, mean accepted length "
                      f"{r['mean_accepted_length']:.2f}, copy fraction {r['copy_fraction']:.2f}",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table([[r["case"], r["batch"], f"{r['plain_tokens_per_s']:.1f}",
                  f"{r['spec_tokens_per_s']:.1f}",
                  f"{r['ratio_median']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]",
                  f"{r['acceptance_rate']:.2f}", f"{r['mean_accepted_length']:.2f}",
                  f"{r['copy_fraction']:.2f}"]
                 for r in results],
                ["case", "batch", "plain tok/s", "spec tok/s", "ratio", "acceptance",
                 "accepted len", "copy fraction"]))
    rec = {**record_header("spec"), "settings": vars(args), "results": results}
    if args.out:
        write_json(args.out, rec)


if __name__ == "__main__":
    main()
