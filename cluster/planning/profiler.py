"""Measure the local engine: step times over a grid of work mixes, start-up
time, and perplexity on a held-out text.

Each grid point is a mix: a prompt chunk of ``n`` new tokens after ``c``
cached ones, beside ``B`` sequences decoding at attention length ``L``.
The engine (``LLMEngine``, the one every replica runs) is brought to that
state through its own requests, then ``engine.step()`` is timed; the step's
actual mix is read back from the sequences (tokens each one computed), not
assumed, so a row always states what the step did. Perplexity is scored
through the engine's prompt-scoring path (``SamplingParams.prompt_logprobs``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from splitserve.cluster.planning.records import StepSample, chunk_attn

HELDOUT_PATH = Path(__file__).with_name("heldout.txt")


@dataclass(frozen=True)
class Grid:
    prefill_tokens: tuple[int, ...]  # n (0: no prompt chunk)
    cached_tokens: tuple[int, ...]  # c, for n > 0
    decode_seqs: tuple[int, ...]  # B (0: no decoding sequences)
    decode_lengths: tuple[int, ...]  # L, for B > 0
    repeats: int

    def points(self, max_len: int, block_size: int) -> list[tuple[int, int, int, int]]:
        """(n, c, B, L) mixes that fit a context of ``max_len`` tokens; c is
        rounded down to whole blocks (only whole blocks are cached)."""
        out = []
        for n in self.prefill_tokens:
            for c in (self.cached_tokens if n else (0,)):
                c = c // block_size * block_size
                if n and n + c + 1 > max_len:
                    continue
                for b in self.decode_seqs:
                    for L in (self.decode_lengths if b else (0,)):
                        if (n == 0 and b == 0) or (b and L + 2 > max_len):
                            continue
                        if (n, c, b, L) not in out:
                            out.append((n, c, b, L))
        return out


FULL_GRID = Grid(prefill_tokens=(0, 16, 64, 256, 512), cached_tokens=(0, 256),
                 decode_seqs=(0, 1, 4, 16), decode_lengths=(32, 256, 1024), repeats=5)
FAST_GRID = Grid(prefill_tokens=(0, 16, 48), cached_tokens=(0, 32), decode_seqs=(0, 1, 4),
                 decode_lengths=(24,), repeats=3)


class _Prompts:
    """Distinct prompts (no accidental prefix hits), deterministic."""

    def __init__(self, vocab: int):
        self.vocab = max(vocab, 8)
        self.n = 0

    def make(self, length: int) -> list[int]:
        self.n += 1
        # a tag token first: no two prompts share their first block
        return [5 + (self.n * 7919 + i * 104729) % (self.vocab - 5) for i in range(length)]


def _snapshot(engine) -> dict:
    seqs = list(engine.scheduler.waiting) + list(engine.scheduler.running)
    return {id(s): (s, s.num_computed_tokens, s.num_tokens) for s in seqs}


def measure_step(engine) -> StepSample:
    """Time one ``engine.step()`` and read back the mix it ran."""
    before = _snapshot(engine)
    t0 = time.perf_counter()
    engine.step()
    dt = time.perf_counter() - t0
    p_tok = p_seqs = d_seqs = d_ctx = 0
    p_attn = 0.0
    for seq, computed, total in before.values():
        # a sequence admitted by this step starts after its cached prefix
        start = computed if computed else seq.num_cached_tokens
        done = seq.num_computed_tokens - start
        if done <= 0:  # not scheduled, or preempted back to 0
            continue
        cached_now = start
        if done == 1 and computed == total - 1 and computed >= seq.num_prompt_tokens:
            d_seqs += 1
            d_ctx += computed + 1
        else:
            p_tok += done
            p_seqs += 1
            p_attn += chunk_attn(done, cached_now)
    return StepSample(p_tok, p_attn, p_seqs, d_seqs, d_ctx, dt)


def _setup_mix(engine, prompts: _Prompts, n: int, c: int, b: int, L: int) -> str | None:
    """Bring ``engine`` (idle) to: ``b`` sequences decoding at length ``L``
    and, when n > 0, one waiting prompt of n new tokens after c cached ones.
    Returns the prompt request's id."""
    from splitserve.engine.sampling_params import SamplingParams

    long_run = SamplingParams(max_tokens=engine.max_model_len - (L - 1), temperature=0.0,
                              ignore_eos=True)
    for _ in range(b):
        engine.add_request(None, prompt_token_ids=prompts.make(L - 1), params=long_run)
    while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    if n == 0:
        return None
    prompt = prompts.make(c + n)
    if c:
        # cache the prefix: a one-token request over its first c + 1 tokens
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        rid = engine.add_request(None, prompt_token_ids=prompt[:c + 1], params=one)
        while rid in engine.requests:
            engine.step()
    return engine.add_request(None, prompt_token_ids=prompt, params=SamplingParams(
        max_tokens=1, temperature=0.0, ignore_eos=True))


def _clear(engine) -> None:
    for rid in list(engine.requests):
        engine.abort(rid)


def profile_steps(engine, grid: Grid, progress: Callable[[int, int], None] | None = None
                  ) -> list[StepSample]:
    """One row per grid point: the median step time over ``grid.repeats``."""
    prompts = _Prompts(engine.model_cfg.vocab_size)
    points = grid.points(engine.max_model_len, engine.cfg.block_size)
    _setup_mix(engine, prompts, *points[-1])  # warm-up: allocator, caches, lazy inits
    measure_step(engine)
    _clear(engine)
    rows = []
    for i, (n, c, b, L) in enumerate(points):
        times, mix = [], None
        for _ in range(grid.repeats):
            _setup_mix(engine, prompts, n, c, b, L)
            s = measure_step(engine)
            _clear(engine)
            times.append(s.step_s)
            mix = mix or s
        rows.append(StepSample(mix.prefill_tokens, mix.prefill_attn, mix.prefill_seqs,
                               mix.decode_seqs, mix.decode_context, statistics.median(times),
                               len(times), statistics.pstdev(times)))
        if progress:
            progress(i + 1, len(points))
    return rows


def perplexity(engine, text: str, max_tokens: int | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored) of ``text``, in windows of the engine's
    context, through ``prompt_logprobs``: exp of the mean negative log
    probability of every token after each window's first."""
    from splitserve.engine.sampling_params import SamplingParams

    ids = engine.tokenize(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    window = min(engine.max_model_len - 1, 1024)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("the held-out text is shorter than two tokens")
    total, count = 0.0, 0
    for r in engine.generate(windows, params):
        for lp in r.prompt_logprobs[1:]:
            total += lp.logprob
            count += 1
    return math.exp(-total / count), count


def timed_engine(cfg) -> tuple[object, float]:
    """(LLMEngine, seconds its construction took: load and cache allocation)."""
    from splitserve.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    return engine, time.perf_counter() - t0
