"""Batched next-token sampling over one decode step's logits.

Per row, in this order:
  0. logit_bias: each listed token's bias is added to its logit (OpenAI
     semantics; -100 all but bans a token, +100 all but forces it);
  1. repetition penalty over prompt + output tokens (Hugging Face semantics:
     a seen token's positive logit is divided by the penalty, a negative one
     multiplied);
  2. presence / frequency penalties over output tokens (OpenAI semantics:
     ``logit -= frequency * count + presence * (count > 0)``);
  3. structured output: tokens the request's grammar does not allow next get
     -inf (splitserve.engine.structured);
  4. min_tokens: EOS and stop_token_ids get -inf until ``min_tokens`` output
     tokens exist, unless the grammar allows nothing else (the grammar wins);
  5. greedy rows (temperature 0) take the argmax; the others divide by the
     temperature, keep the top_k logits (ties at the k-th value stay), keep
     the smallest most-probable set whose mass reaches top_p, drop tokens
     below ``min_p * max_prob``, and sample.

Speculative decoding (``splitserve.engine.spec``) verifies a draft token
per row (``SeqSamplingState.draft_token``): greedy and seeded rows draw as
above and the caller compares; an unseeded sampled row accepts the draft
with probability ``p(draft)`` of the distribution of step 5 and otherwise
draws from that distribution without it (``spec.rejection``).

Logprobs are the log_softmax of the logits after steps 0-4 and before the
temperature and truncation of step 5: they describe the model's
distribution as the request shaped it with penalties, not the sampling
temperature, so a greedy and a sampled request report the same numbers and
a token outside top_p still has a finite logprob among the alternatives.

Sampling is an exponential race, ``argmax(probs / E)`` with ``E ~ Exp(1)``
per token, which draws exactly from ``probs``. A seeded row's noise is a
counter-based hash of (seed, output position, token id),
computed for all seeded rows at once with integer tensor ops on the logits'
device (the same bits on every device): the token depends only on the
request and the logits, not on batch neighbours, on which replica runs the
step (the first token is sampled by prefill, the rest by decode) or on
preemption and recompute. An unseeded row hashes a fresh seed drawn from the
sampler's generator (on CPU this is also faster than torch's own
``exponential_``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from splitserve.engine.hashing import SPLITMIX_GOLDEN, SPLITMIX_MUL1, SPLITMIX_MUL2, splitmix64
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.spec.rejection import sample_with_drafts
from splitserve.engine.structured import GrammarMatcher, apply_masks

# Temperatures below this are sampled greedily: dividing by them overflows.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SeqSamplingState:
    """What the sampler needs to know about one sequence at this step."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]  # tokens sampled so far; len() is this step's position
    eos_token_ids: tuple[int, ...] = ()  # masked while min_tokens is unmet (unless ignore_eos)
    # output produced before a resume (the first ``num_prior`` of output_ids):
    # it counts for positions and penalties, not for min_tokens
    num_prior: int = 0
    matcher: GrammarMatcher | None = None  # the structured-output constraint, if any
    # speculative decoding: the draft token this row verifies (None: none).
    # An unseeded sampled row accepts or resamples it by rejection sampling;
    # greedy and seeded rows draw as always (splitserve.engine.spec.rejection)
    draft_token: int | None = None
    _prompt_tensor: Tensor | None = field(default=None, repr=False, compare=False)
    _prompt_src_len: int = field(default=-1, repr=False, compare=False)
    _output_buf: Tensor | None = field(default=None, repr=False, compare=False)
    _output_len: int = field(default=0, repr=False, compare=False)
    _output_src: list[int] | None = field(default=None, repr=False, compare=False)
    _bias: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)
    _bias_src: tuple[dict, int] | None = field(default=None, repr=False, compare=False)

    def prompt_tensor(self) -> Tensor:
        """The prompt's distinct ids as an int64 CPU tensor, made once
        (the repetition penalty reads it each step)."""
        if self._prompt_tensor is None or self._prompt_src_len != len(self.prompt_ids):
            self._prompt_tensor = torch.tensor(sorted(set(self.prompt_ids)), dtype=torch.long)
            self._prompt_src_len = len(self.prompt_ids)
        return self._prompt_tensor

    def output_tensor(self) -> Tensor:
        """``output_ids`` as an int64 CPU tensor. Kept in a buffer that grows
        by the tokens appended since the last call, so a step converts one
        token, not the whole output (``output_ids`` only ever grows; a
        different list starts the buffer over)."""
        n = len(self.output_ids)
        if self._output_src is not self.output_ids or n < self._output_len:
            self._output_buf, self._output_len = torch.empty(max(16, n), dtype=torch.long), 0
            self._output_src = self.output_ids
        if n > self._output_len:
            if n > len(self._output_buf):
                grown = torch.empty(max(n, 2 * len(self._output_buf)), dtype=torch.long)
                grown[:self._output_len] = self._output_buf[:self._output_len]
                self._output_buf = grown
            new = self.output_ids[self._output_len:n]
            self._output_buf[self._output_len:n] = torch.tensor(new, dtype=torch.long)
            self._output_len = n
        return self._output_buf[:n]

    def bias_tensors(self, vocab: int) -> tuple[Tensor, Tensor]:
        """``params.logit_bias`` as (token ids int64, biases float32) CPU
        tensors, made once; ids past ``vocab`` are left out (ingress refuses
        them; the sampler never indexes past the logits)."""
        src = (self.params.logit_bias, vocab)
        if self._bias_src is None or self._bias_src[0] is not src[0] or self._bias_src[1] != vocab:
            items = [(t, v) for t, v in self.params.logit_bias.items() if t < vocab]
            self._bias = (torch.tensor([t for t, _ in items], dtype=torch.long),
                          torch.tensor([v for _, v in items], dtype=torch.float32))
            self._bias_src = src
        return self._bias

    @property
    def num_new_outputs(self) -> int:
        return len(self.output_ids) - self.num_prior

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_ids: list[int],
        eos_token_ids: tuple[int, ...] = (),
    ) -> "SeqSamplingState":
        return cls(params, prompt_ids, [], tuple(eos_token_ids))


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), most probable first


class Sampler:
    """One per engine. ``seed`` fixes the shared generator of unseeded rows
    (tests, benchmarks); None seeds it from the OS."""

    def __init__(self, seed: int | None = None):
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(
        self, logits: Tensor, states: list[SeqSamplingState]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        # logits: [B, V]
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits must be [batch, vocab] with one row per state; got shape "
                f"{tuple(logits.shape)} for {len(states)} states"
            )
        if not states:
            return [], []
        params = [s.params for s in states]
        greedy = [p.temperature < GREEDY_TEMPERATURE for p in params]
        want_logprobs = any(p.logprobs is not None for p in params)
        needs_rewrite = any(
            p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0 or s.num_new_outputs < p.min_tokens
            or s.matcher is not None
            for s, p in zip(states, params)
        )
        x = logits if logits.dtype == torch.float32 else logits.float()
        if all(greedy) and not needs_rewrite and not want_logprobs:
            return x.argmax(dim=-1).tolist(), [None] * len(states)

        if needs_rewrite:
            x = x.clone() if x is logits else x  # never write into the caller's logits
            _apply_logit_bias(x, states)
            _apply_repetition_penalty(x, states)
            _apply_presence_frequency(x, states)
            constrained = [i for i, s in enumerate(states) if s.matcher is not None]
            if constrained:
                apply_masks(x, constrained, [states[i].matcher for i in constrained])
            _mask_until_min_tokens(x, states)

        if all(greedy):
            tokens = x.argmax(dim=-1)  # [B]
        else:
            tokens = torch.empty(len(states), dtype=torch.long, device=x.device)
            g_rows = [i for i, g in enumerate(greedy) if g]
            s_rows = [i for i, g in enumerate(greedy) if not g]
            if g_rows:
                g_idx = torch.tensor(g_rows, device=x.device)
                tokens[g_idx] = x[g_idx].argmax(dim=-1)
            s_idx = torch.tensor(s_rows, device=x.device)
            tokens[s_idx] = self._sample(x[s_idx], [states[i] for i in s_rows])
        token_ids = tokens.tolist()
        return token_ids, _logprobs(x, tokens, params) if want_logprobs else [None] * len(states)

    def _sample(self, x: Tensor, states: list[SeqSamplingState]) -> Tensor:
        # x: [S, V] penalised logits of the rows that sample; returns [S] token ids
        params = [s.params for s in states]
        dev = x.device
        temps = torch.tensor([p.temperature for p in params], device=dev)
        y = x / temps[:, None]  # a new tensor, so the masks below may write in place
        _mask_top_k(y, [p.top_k for p in params])
        _mask_top_p(y, [p.top_p for p in params])
        _mask_min_p(y, [p.min_p for p in params])
        probs = y.softmax(dim=-1)  # [S, V]
        noise = self._exponential_noise(probs, states)
        drafts = [s.draft_token if s.params.seed is None else None for s in states]
        if any(d is not None for d in drafts):
            return sample_with_drafts(probs, noise, drafts, self._generator)
        return probs.div_(noise).argmax(dim=-1)

    def _exponential_noise(self, probs: Tensor, states: list[SeqSamplingState]) -> Tensor:
        # probs: [S, V] -> Exp(1) noise of the same shape, never 0 (a zero would
        # let any token, even a masked one, win)
        return hashed_exponential(self._row_seeds(states), probs.shape[1], probs.device)

    def _row_seeds(self, states: list[SeqSamplingState]) -> list[int]:
        """A seeded row's step seed from (seed, position);
        an unseeded row's a fresh draw from the shared generator."""
        unseeded = sum(1 for s in states if s.params.seed is None)
        fresh = iter(torch.randint(0, 1 << 62, (unseeded,), generator=self._generator).tolist()
                     if unseeded else ())
        return [next(fresh) if s.params.seed is None
                else _step_seed(s.params.seed, len(s.output_ids))
                for s in states]


def _i64(u: int) -> int:
    """A uint64 as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN, _MIX1, _MIX2 = (_i64(c) for c in (SPLITMIX_GOLDEN, SPLITMIX_MUL1, SPLITMIX_MUL2))


def _shr(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def hashed_exponential(step_seeds: list[int], vocab: int, device: torch.device) -> Tensor:
    """[len(step_seeds), vocab] float32 Exp(1) noise: row r, token j is
    ``-log(u)`` with ``u`` the top 24 bits of ``splitmix64(step_seeds[r] +
    (j + 1) * golden)`` (uint64 arithmetic, done in wrapping int64), so
    every device computes the same noise for the same seed."""
    seeds = torch.tensor([_i64(s) for s in step_seeds], dtype=torch.int64, device=device)
    z = torch.arange(1, vocab + 1, dtype=torch.int64, device=device) * _GOLDEN
    z = z[None, :] + seeds[:, None]
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    u = (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return u.log_().neg_()


def _step_seed(seed: int, position: int) -> int:
    # Hashing, not adding: seed s at step k must not equal seed s+1 at step k-1.
    return splitmix64(splitmix64(seed) ^ splitmix64(position))


def _flat_ids(rows: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    # rows: 1-D int64 CPU tensors -> (row index per token, token id per token),
    # both [sum(len(r))] on ``device``
    lens = torch.tensor([len(r) for r in rows])
    row_idx = torch.repeat_interleave(torch.arange(len(rows)), lens)
    return row_idx.to(device), torch.cat(rows).to(device)


def _apply_logit_bias(x: Tensor, states: list[SeqSamplingState]) -> None:
    rows = [i for i, s in enumerate(states) if s.params.logit_bias]
    if not rows:
        return
    dev = x.device
    biases = [states[i].bias_tensors(x.shape[1]) for i in rows]
    r_idx, ids = _flat_ids([ids for ids, _ in biases], dev)
    if ids.numel() == 0:
        return
    row = torch.tensor(rows, device=dev)[r_idx]
    x[row, ids] += torch.cat([vals for _, vals in biases]).to(device=dev, dtype=x.dtype)


def _apply_repetition_penalty(x: Tensor, states: list[SeqSamplingState]) -> None:
    # Sparse: only the (row, token) pairs seen are read and written, never a
    # [rows, vocab] mask. A token seen twice is written twice with the same
    # value (both computed from the logit before the write).
    rows = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    if not rows:
        return
    dev = x.device
    r_idx, ids = _flat_ids(
        [torch.cat((states[i].prompt_tensor(), states[i].output_tensor())) for i in rows], dev)
    pen = torch.tensor([states[i].params.repetition_penalty for i in rows], device=dev)[r_idx]
    row = torch.tensor(rows, device=dev)[r_idx]
    val = x[row, ids]
    x[row, ids] = torch.where(val < 0, val * pen, val / pen)


def _apply_presence_frequency(x: Tensor, states: list[SeqSamplingState]) -> None:
    rows = [
        i for i, s in enumerate(states)
        if s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0
    ]
    if not rows:
        return
    dev = x.device
    r_idx, ids = _flat_ids([states[i].output_tensor() for i in rows], dev)
    if ids.numel() == 0:
        return
    # distinct (row, token) pairs and how often each was sampled
    keys, counts = torch.unique(r_idx * x.shape[1] + ids, return_counts=True)
    r_idx, ids = keys // x.shape[1], keys % x.shape[1]
    freq = torch.tensor([states[i].params.frequency_penalty for i in rows], device=dev)[r_idx]
    pres = torch.tensor([states[i].params.presence_penalty for i in rows], device=dev)[r_idx]
    row = torch.tensor(rows, device=dev)[r_idx]
    x[row, ids] -= freq * counts.to(x.dtype) + pres


def _mask_until_min_tokens(x: Tensor, states: list[SeqSamplingState]) -> None:
    vocab = x.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        p = s.params
        if s.num_new_outputs >= p.min_tokens:
            continue
        # With ignore_eos, EOS never ends the sequence, so there is nothing to hold off.
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(s.eos_token_ids))
        for t in sorted(banned):
            if t < vocab:  # ids past the vocabulary can never be sampled anyway
                rows.append(i)
                cols.append(t)
    if not rows:
        return
    r, c = torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)
    saved = x[r, c]
    x[r, c] = -torch.inf
    # where a grammar allows only EOS (the output must end here), EOS stays
    dead = torch.isneginf(x[r].amax(dim=-1))
    if dead.any():
        x[r[dead], c[dead]] = saved[dead]


def _mask_top_k(y: Tensor, top_ks: list[int]) -> None:
    # y: [S, V]; keep logits >= the k-th largest of their row
    vocab = y.shape[1]
    ks = [k if 0 < k < vocab else 0 for k in top_ks]  # 0: off for this row
    if not any(ks):
        return
    k_max = max(ks)
    kth = y.topk(k_max, dim=-1).values  # [S, k_max], descending
    pos = torch.tensor([max(k, 1) - 1 for k in ks], device=y.device)[:, None]
    thresh = kth.gather(1, pos)  # [S, 1]
    off = torch.tensor([k == 0 for k in ks], device=y.device)[:, None]
    y.masked_fill_((y < thresh) & ~off, -torch.inf)


def _mask_top_p(y: Tensor, top_ps: list[float]) -> None:
    # y: [S, V]; keep the most probable tokens until their mass reaches top_p
    if all(p >= 1.0 for p in top_ps):
        return
    sorted_logits, order = y.sort(dim=-1, descending=True)  # [S, V]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more probable tokens
    # top_p == 1 rows keep everything, even where float sums pass 1.0 early.
    limit = torch.tensor([p if p < 1.0 else torch.inf for p in top_ps], device=y.device)
    drop_sorted = mass_before >= limit[:, None]
    drop_sorted[:, 0] = False  # the most probable token always stays
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    y.masked_fill_(drop, -torch.inf)


def _mask_min_p(y: Tensor, min_ps: list[float]) -> None:
    # y: [S, V]; drop tokens whose probability is below min_p * the row's top probability
    if not any(p > 0.0 for p in min_ps):
        return
    probs = y.softmax(dim=-1)
    floor = torch.tensor(min_ps, device=y.device)[:, None] * probs.max(dim=-1, keepdim=True).values
    y.masked_fill_(probs < floor, -torch.inf)


def _logprobs(x: Tensor, tokens: Tensor, params: list[SamplingParams]) -> list[TokenLogprobs | None]:
    # x: [B, V] penalised logits; tokens: [B]
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    idx = torch.tensor(rows, device=x.device)
    lp = x[idx].log_softmax(dim=-1)  # [R, V]
    chosen_ids = tokens[idx]
    chosen = lp.gather(1, chosen_ids[:, None])[:, 0].tolist()
    n_max = max(params[i].logprobs for i in rows)
    top_vals: list[list[float]] = []
    top_ids: list[list[int]] = []
    if n_max > 0:
        top = lp.topk(min(n_max, lp.shape[1]), dim=-1)
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    out: list[TokenLogprobs | None] = [None] * len(params)
    for j, (i, tok) in enumerate(zip(rows, chosen_ids.tolist())):
        n = params[i].logprobs
        alts = list(zip(top_ids[j][:n], top_vals[j][:n])) if n > 0 else []
        out[i] = TokenLogprobs(token_id=tok, logprob=chosen[j], top=alts)
    return out
