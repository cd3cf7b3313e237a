"""Speculative decoding's acceptance measured through the engine's own
speculative path, for the profile database's ``speculation`` rows.

Two workloads from a held-out text, greedy, a fixed number of drafts per
step (``adaptive`` off, so every step drafts ``k`` where the proposer has
drafts):

  code-edit  the shape of editing a file, where the output mostly repeats
             the prompt: prompt = prefix + (the model's own greedy
             continuation of it) + a blank line + prefix. Where the model
             writes the same continuation again, prompt lookup finds it in
             the prompt, as it finds the unchanged lines of a file being
             edited.
  free       free generation from passages of the text: nothing to copy.

Each decoding step of a sequence with room for ``k`` drafts counts once,
whether or not the proposer had a draft for it (n-gram lookup often has
none on free text: such steps yield one token), so ``tokens_per_step`` is
what the method yields on that text and the fitted per-token rate
(``acceptance.per_token_rate``) is what the planner and the simulator
should assume for it. The engine's own counters (acceptance rate over
drafted tokens, mean accepted length) are kept beside it.
``benchmarks/bench_spec.py`` builds its prompts here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from splitserve.cluster.planning.acceptance import per_token_rate
from splitserve.cluster.planning.records import MEASURED, SpecAcceptance

WORKLOADS = ("code-edit", "free")


@dataclass(frozen=True)
class SpecMethod:
    """A speculation method to measure: ``draft_model`` (a checkpoint
    folder) for method draft, named in rows by ``draft_key``."""

    method: str
    k: int = 4
    draft_model: str | None = None
    draft_key: str = ""
    ngram_min: int = 1
    ngram_max: int = 4

    @property
    def draft(self) -> str:
        return self.draft_key if self.method == "draft" else f"ngram:{self.ngram_min}-{self.ngram_max}"

    def engine_config(self):
        from splitserve.engine.spec.config import SpeculativeConfig

        return SpeculativeConfig(method=self.method, num_speculative_tokens=self.k,
                                 draft_model=self.draft_model, ngram_min=self.ngram_min,
                                 ngram_max=self.ngram_max, adaptive=False)


def corpus_prefixes(tokenizer, text: str, n: int, length: int) -> list[list[int]]:
    """``n`` passages of ``length`` tokens spread evenly over ``text``."""
    ids = tokenizer.encode(text)
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than a {length}-token prefix")
    step = max(1, (len(ids) - length) // n)
    return [ids[i * step:i * step + length] for i in range(n)]


def copy_prompts(plain, prefixes: list[list[int]], body_len: int,
                 rounds: int = 0) -> list[list[int]]:
    """code-edit prompts: each prefix, ``plain``'s greedy continuation of it,
    a blank line, and the prefix again.

    With ``rounds`` > 0 the body is refined that many times: it becomes
    ``plain``'s greedy continuation of the whole prompt built from the
    previous body (its tail kept past what was generated), so that the
    output repeats the body as a rewrite of a shown file does. Refining
    stops early once no body changes."""
    from splitserve.engine.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=body_len, temperature=0.0, ignore_eos=True)
    sep = plain.tokenizer.encode("\n\n", add_special_tokens=False)
    bodies = [b.token_ids for b in plain.generate(prefixes, sp)]
    for _ in range(rounds):
        outs = plain.generate([p + b + sep + p for p, b in zip(prefixes, bodies)], sp)
        refined = [o.token_ids + b[len(o.token_ids):] for o, b in zip(outs, bodies)]
        if refined == bodies:
            break
        bodies = refined
    return [p + b + sep + p for p, b in zip(prefixes, bodies)]


def copy_fraction(prompt: list[int], output: list[int], n_min: int = 1,
                  n_max: int = 4) -> float:
    """The share of ``output``'s tokens that prompt lookup predicts, each
    from the prompt and the output before it (the n-gram proposer's own
    lookup, one token at a time): how much of the output copies the
    prompt."""
    from splitserve.engine.spec.ngram import ngram_lookup

    if not output:
        return 0.0
    seq = list(prompt)
    hits = 0
    for t in output:
        hits += ngram_lookup(seq, n_min, n_max, 1) == [t]
        seq.append(t)
    return hits / len(output)


def workload_prompts(plain, kind: str, text: str, n: int, prefix_len: int,
                     new_tokens: int) -> list[list[int]]:
    prefixes = corpus_prefixes(plain.tokenizer, text, n, prefix_len)
    if kind == "free":
        return prefixes
    if kind == "code-edit":
        return copy_prompts(plain, prefixes, new_tokens + 8)
    raise ValueError(f"workload must be one of {WORKLOADS}, got {kind!r}")


def measure(engine, method: SpecMethod, workload: str, prompts: list[list[int]],
            new_tokens: int, dataset: str = "", source: str = "splitserve profile"
            ) -> SpecAcceptance:
    """Run ``prompts`` greedily on ``engine`` (built with
    ``method.engine_config()``) and count what speculation yielded."""
    from splitserve.engine.sampling_params import SamplingParams

    if new_tokens < method.k + 2:
        raise ValueError(f"new_tokens ({new_tokens}) must exceed k + 1 ({method.k + 1})")
    c0 = engine.load_stats()
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(None, prompt_token_ids=list(p), params=sp) for p in prompts]
    tokens = steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            got = len(out.new_token_ids)
            before = out.num_output_tokens - got
            # a decode step (not the prompt's) with room for the full k drafts
            if before >= 1 and new_tokens - before - 1 >= method.k:
                tokens += got
                steps += 1
    leftover = [i for i in ids if i in engine.requests]
    for i in leftover:
        engine.abort(i)
    c1 = engine.load_stats()
    drafts = c1.spec_drafts - c0.spec_drafts
    proposed = c1.spec_draft_tokens - c0.spec_draft_tokens
    accepted = c1.spec_accepted_tokens - c0.spec_accepted_tokens
    per_step = tokens / steps if steps else 0.0
    return SpecAcceptance(
        method=method.method, draft=method.draft, workload=workload, k=method.k,
        acceptance=per_token_rate(per_step, method.k),
        acceptance_rate=accepted / proposed if proposed else 0.0,
        mean_accepted_length=1.0 + accepted / drafts if drafts else 1.0,
        draft_tokens=proposed, tokens_per_step=per_step, steps=steps, dataset=dataset,
        source=source, provenance=MEASURED)


def run(db, shape, engine_kwargs: dict, methods: list[SpecMethod], text_path: Path,
        fast: bool = False, log=print, plain=None) -> list[SpecAcceptance]:
    """Measure every method on every workload and write the rows; ``plain``:
    an engine of the model without speculation (built when not given), which
    writes the code-edit prompts."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    n, prefix_len, new_tokens = (4, 24, 24) if fast else (16, 32, 64)
    base = dict(engine_kwargs, num_blocks=1024, max_num_seqs=n, max_num_batched_tokens=2048,
                enable_prefix_caching=False)
    if plain is None:
        plain = LLMEngine(EngineConfig(**base))
    text = Path(text_path).read_text(encoding="utf-8")
    prompts = {w: workload_prompts(plain, w, text, n, prefix_len, new_tokens) for w in WORKLOADS}
    rows = []
    for m in methods:
        eng = LLMEngine(EngineConfig(**base, speculative=m.engine_config()))
        for w in WORKLOADS:
            row = measure(eng, m, w, prompts[w], new_tokens, Path(text_path).name)
            db.add_speculation(shape, row)
            rows.append(row)
            log(f"  speculation {m.method} ({m.draft}) k={m.k} on {w}: per-token acceptance "
                f"{row.acceptance:.2f} ({row.tokens_per_step:.2f} tokens per step over "
                f"{row.steps} steps; drafted tokens accepted {row.acceptance_rate:.2f}, mean "
                f"accepted length {row.mean_accepted_length:.2f})")
    return rows


# -- a bench_spec record -------------------------------------------------------------
# bench_spec's case names: "<workload> / <method ...>", its copy workload is code-edit
_BENCH_WORKLOADS = {"copy": "code-edit", "free": "free"}


def from_bench_record(path: str | Path) -> list[SpecAcceptance]:
    """Rows from a ``benchmarks/bench_spec.py`` JSON record: its fixed-k
    cases of n-gram and the shipped draft (adaptive cases drafted fewer
    tokens at some steps; draft = target and the one-layer cut are not
    deployable drafts), the drafted tokens of every batch summed. The record
    counts drafted runs only, so the per-token rate is fitted to its mean
    accepted length (steps where n-gram lookup found nothing are not in it)."""
    p = Path(path)
    try:
        rec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read the bench_spec record: {e}") from None
    results = rec.get("results") if isinstance(rec, dict) else None
    if not results or rec.get("benchmark", rec.get("kind", "spec")) not in ("spec",):
        raise ValueError(f"{p}: not a bench_spec record (no 'results')")
    settings = rec.get("settings") or {}
    k = int(settings.get("k", 4))
    sums: dict[tuple[str, str], list[float]] = {}
    for r in results:
        case = str(r.get("case", ""))
        wl, _, how = case.partition(" / ")
        fixed = "fixed k" in how or settings.get("fixed")
        if wl not in _BENCH_WORKLOADS or not fixed:
            continue
        if how.startswith("ngram"):
            method = "ngram"
        elif how.startswith("shipped draft"):
            method = "draft"
        else:
            continue
        drafted = float(r["draft_tokens"])
        accepted = float(r["acceptance_rate"]) * drafted
        mal = float(r["mean_accepted_length"])
        runs = accepted / (mal - 1.0) if mal > 1.0 else 0.0
        s = sums.setdefault((method, _BENCH_WORKLOADS[wl]), [0.0, 0.0, 0.0])
        s[0] += drafted
        s[1] += accepted
        s[2] += runs
    from splitserve.engine.default_model import DEFAULT_DRAFT_NAME, default_draft_path
    from splitserve.cluster.planning.shapes import shape_from_config_json

    shipped = shape_from_config_json(default_draft_path(), DEFAULT_DRAFT_NAME).key
    out = []
    for (method, workload), (drafted, accepted, runs) in sorted(sums.items()):
        if drafted <= 0:
            continue
        mal = 1.0 + accepted / runs if runs else 1.0
        # n-gram runs may draft fewer than k tokens: the fit takes the mean drafted
        k_eff = drafted / runs if runs else float(k)
        out.append(SpecAcceptance(
            method=method, draft="ngram:1-4" if method == "ngram" else shipped,
            workload=workload, k=k, acceptance=per_token_rate(mal, k_eff),
            acceptance_rate=accepted / drafted, mean_accepted_length=mal,
            draft_tokens=int(drafted), tokens_per_step=0.0, steps=0,
            dataset="default model held-out text", source=str(p), provenance=MEASURED))
    if not out:
        raise ValueError(f"{p}: no fixed-k n-gram or shipped-draft cases to import")
    return out
