"""How long one engine step takes, from its mix of work.

A step's inputs (``StepSample.features``): x = (P, A, B, C) with P new
prompt tokens, A causal query-key pairs of those prompt chunks, B decoding
sequences and C the sum of their attention lengths. The model is

    t(x) = overhead + max_i (c_i + w_i . x)

- *fitted* (``fit``): one linear form by least squares over measured
  rows, weighted so that relative error counts (a 5 ms decode step matters
  as much as a 500 ms prefill), with non-negative weights; its fit error
  is reported.
- *roofline* (``roofline``): two forms, compute (FLOPs / achievable
  FLOP/s) and memory (bytes / achievable bandwidth), from the model's shape
  and the hardware's figures under the efficiency model of catalog.yaml.
  A mixture-of-experts model's memory form reads only the experts a step's
  tokens choose: of its routed experts' read time R, a step of T = P + B
  tokens skips R x p^T, p the chance that a token passes over an expert
  (1 - top_k / experts; routing taken as uniform, so the distinct experts
  read are an upper bound: real routers repeat experts more). A decode
  step at batch 1 of a 256-expert top-8 model reads 3% of its experts; a
  prompt chunk of 512 tokens reads all of them.

Decode-only runs of K steps (the simulator coalesces them) have closed
forms: with B fixed, C grows by B per step, so each form is linear in the
step index and the sum over K steps is an arithmetic series per piece.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from splitserve.cluster.planning.hardware import Hardware
from splitserve.cluster.planning.records import DERIVED, MEASURED, EngineSettings, StepSample
from splitserve.cluster.planning.shapes import DTYPE_BYTES, ModelShape

FEATURES = ("prefill_tokens", "prefill_attn", "decode_seqs", "decode_context")
MIN_STEP_S = 1e-6


class StepModelError(ValueError):
    """Too few or degenerate rows to fit a step-time model."""


@dataclass(frozen=True)
class FitReport:
    rows: int
    rmse_s: float
    mean_abs_rel_error: float  # mean |predicted - measured| / measured
    max_abs_rel_error: float
    r2: float

    def describe(self) -> str:
        return (f"{self.rows} rows, mean |error| {self.mean_abs_rel_error:.1%}, max "
                f"{self.max_abs_rel_error:.1%}, RMSE {self.rmse_s * 1e3:.3f} ms, R^2 {self.r2:.3f}")


@dataclass(frozen=True)
class StepTimeModel:
    forms: tuple[tuple[float, float, float, float, float], ...]  # (c, wP, wA, wB, wC)
    overhead_s: float = 0.0
    provenance: str = MEASURED
    source: str = ""  # what it was built from, for reports
    fit: FitReport | None = field(default=None, compare=False)
    # mixture of experts (roofline): form ``routed_form``'s constant reads every routed
    # expert in ``routed_s``; a step of T tokens skips routed_s x expert_pass ** T of it
    routed_s: float = 0.0
    expert_pass: float = 0.0
    routed_form: int = 1

    def unread_s(self, tokens: float) -> float:
        """The routed experts' read time a step of ``tokens`` tokens skips."""
        return self.routed_s * self.expert_pass ** tokens if self.routed_s else 0.0

    def step_s(self, prefill_tokens: float, prefill_attn: float, decode_seqs: float,
               decode_context: float) -> float:
        best = -math.inf  # max over the forms, without a generator per step
        skip = self.unread_s(prefill_tokens + decode_seqs) if self.routed_s else 0.0
        for i, (c, wp, wa, wb, wc) in enumerate(self.forms):
            v = c + wp * prefill_tokens + wa * prefill_attn + wb * decode_seqs + wc * decode_context
            if skip and i == self.routed_form:
                v -= skip
            if v > best:
                best = v
        t = self.overhead_s + best
        return t if t > MIN_STEP_S else MIN_STEP_S

    def with_serving(self, per_step_s: float, per_seq_s: float, source: str) -> "StepTimeModel":
        """This model plus a serving path's cost of ``per_step_s`` per step
        and ``per_seq_s`` per decoding sequence (a linear term, so decode
        runs keep their closed form)."""
        if per_step_s <= 0 and per_seq_s <= 0:
            return self
        forms = tuple((c, wp, wa, wb + per_seq_s, wc) for c, wp, wa, wb, wc in self.forms)
        return replace(self, forms=forms, overhead_s=self.overhead_s + per_step_s,
                       source=f"{self.source}; + serving {per_step_s * 1e3:.2f} ms/step + "
                              f"{per_seq_s * 1e3:.2f} ms/sequence ({source})")

    def sample_s(self, s: StepSample) -> float:
        return self.step_s(*s.features())

    # -- coalesced decode runs ----------------------------------------------------
    def _lines(self, batch: int, context: float) -> list[tuple[float, float]]:
        """Each form over a decode run as (value at step 0, increase per step)."""
        skip = self.unread_s(batch)
        return [(self.overhead_s + c + wb * batch + wc * context
                 - (skip if i == self.routed_form else 0.0), wc * batch)
                for i, (c, _, _, wb, wc) in enumerate(self.forms)]

    def decode_run_s(self, batch: int, context: float, steps: int) -> float:
        """Seconds of ``steps`` decode steps of ``batch`` sequences whose
        attention lengths sum to ``context`` at the first step."""
        if steps <= 0:
            return 0.0
        forms = self.forms
        if len(forms) == 1:
            c, _, _, wb, wc = forms[0]
            a = self.overhead_s + c + wb * batch + wc * context
            return _series(a if a > MIN_STEP_S else MIN_STEP_S, wc * batch, 0, steps)
        if len(forms) == 2:  # the roofline: compute and memory
            (c1, _, _, wb1, wc1), (c2, _, _, wb2, wc2) = forms
            a1 = self.overhead_s + c1 + wb1 * batch + wc1 * context
            a2 = self.overhead_s + c2 + wb2 * batch + wc2 * context
            if self.routed_s:  # the batch is fixed over the run, so are the experts it reads
                if self.routed_form == 0:
                    a1 -= self.unread_s(batch)
                else:
                    a2 -= self.unread_s(batch)
            b1, b2 = wc1 * batch, wc2 * batch
            if b1 == b2 or not 0 < (a2 - a1) / (b1 - b2) < steps:
                # one form is above over the whole run: compare at its middle
                mid = (steps - 1) / 2
                a, b = (a1, b1) if a1 + b1 * mid >= a2 + b2 * mid else (a2, b2)
                return _series(a if a > MIN_STEP_S else MIN_STEP_S, b, 0, steps)
            cut = int(math.floor((a2 - a1) / (b1 - b2))) + 1
            first, second = ((a1, b1), (a2, b2)) if a1 >= a2 else ((a2, b2), (a1, b1))
            return (_series(max(first[0], MIN_STEP_S), first[1], 0, cut)
                    + _series(max(second[0], MIN_STEP_S), second[1], cut, steps))
        lines = self._lines(batch, context)
        # the upper envelope of lines is convex: cut [0, steps) where it changes line
        cuts = {0, steps}
        for i, (a1, b1) in enumerate(lines):
            for a2, b2 in lines[i + 1:]:
                if b1 != b2:
                    k = (a2 - a1) / (b1 - b2)
                    if 0 < k < steps:
                        cuts.add(int(math.floor(k)) + 1)
        total = 0.0
        points = sorted(cuts)
        for lo, hi in zip(points, points[1:]):
            mid = (lo + hi - 1) / 2
            a, b = max(lines, key=lambda ln: ln[0] + ln[1] * mid)
            total += _series(max(a, MIN_STEP_S), b, lo, hi)
        return total

    def decode_steps_within(self, batch: int, context: float, seconds: float) -> int:
        """The most decode steps that complete within ``seconds``."""
        if seconds <= 0:
            return 0
        hi = 1
        while self.decode_run_s(batch, context, hi) <= seconds:
            hi *= 2
        lo = hi // 2  # run(lo) <= seconds < run(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.decode_run_s(batch, context, mid) <= seconds:
                lo = mid
            else:
                hi = mid
        return lo

    def describe(self) -> str:
        fit = f"; fit: {self.fit.describe()}" if self.fit else ""
        return f"{self.provenance} step-time model ({self.source}){fit}"

    def to_dict(self) -> dict:
        return {"forms": [dict(zip(("const",) + FEATURES, f)) for f in self.forms],
                "overhead_s": self.overhead_s, "routed_s": self.routed_s,
                "expert_pass": self.expert_pass, "provenance": self.provenance,
                "source": self.source,
                "fit": None if self.fit is None else self.fit.__dict__}


def _series(a: float, b: float, lo: int, hi: int) -> float:
    """sum_{k=lo}^{hi-1} (a + b k)."""
    n = hi - lo
    return n * a + b * (lo + hi - 1) * n / 2


# -- fitting ------------------------------------------------------------------------
def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every weight >= 0: refit without the most negative
    one until none is (the columns here are few and positive)."""
    active = list(range(x.shape[1]))
    while True:
        w = np.zeros(x.shape[1])
        if active:
            sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
            w[active] = sol
        neg = [i for i in active if w[i] < 0]
        if not neg:
            return w
        active.remove(min(neg, key=lambda i: w[i]))


def fit(samples: Sequence[StepSample], source: str = "measured rows") -> StepTimeModel:
    """The fitted model of ``samples`` (at least 3 rows with some variation)."""
    if len(samples) < 3:
        raise StepModelError(f"need at least 3 step-time rows to fit a model, got {len(samples)}")
    y = np.array([s.step_s for s in samples], dtype=np.float64)
    if np.any(y <= 0):
        raise StepModelError("step-time rows must have positive durations")
    x = np.array([(1.0,) + s.features() for s in samples], dtype=np.float64)
    # scale columns to comparable size, weight rows by 1/y (relative error)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    wrow = 1.0 / y
    w = _nonneg_lstsq((x / scale) * wrow[:, None], y * wrow) / scale
    pred = np.maximum(x @ w, MIN_STEP_S)
    rel = np.abs(pred - y) / y
    ss_res = float(np.sum((pred - y) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    report = FitReport(rows=len(samples), rmse_s=math.sqrt(ss_res / len(samples)),
                       mean_abs_rel_error=float(rel.mean()), max_abs_rel_error=float(rel.max()),
                       r2=1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0)
    return StepTimeModel(forms=(tuple(float(v) for v in w),), overhead_s=0.0,
                         provenance=MEASURED, source=source, fit=report)


def evaluate(model: StepTimeModel, samples: Sequence[StepSample]) -> FitReport:
    """The error of ``model`` on rows it was not necessarily fitted to."""
    y = np.array([s.step_s for s in samples])
    pred = np.array([model.sample_s(s) for s in samples])
    rel = np.abs(pred - y) / y
    ss_res = float(np.sum((pred - y) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return FitReport(len(samples), math.sqrt(ss_res / len(samples)), float(rel.mean()),
                     float(rel.max()), 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0)


# -- roofline -----------------------------------------------------------------------
def device_scale(hw: Hardware, devices: int) -> float:
    """How many single devices a tensor-parallel replica of ``devices`` is worth."""
    return devices * (hw.efficiency.tensor_parallel if devices > 1 else 1.0)


def roofline(shape: ModelShape, hw: Hardware, settings: EngineSettings) -> StepTimeModel:
    """Step time from the shape and the hardware's peaks under its efficiency
    model: compute = FLOPs / (peak x matmul efficiency), memory = bytes /
    (bandwidth x memory efficiency), a step takes the larger plus the fixed
    step overhead. FLOPs: 2 x active parameters per token (lm head
    included), 4 x layers x heads x head_dim per query-key pair (QK^T and
    PV). Bytes: the weights once per step (of a mixture of experts, the
    routed experts a step's tokens choose: ``StepTimeModel.unread_s``), K and
    V written per new token and read per attended context token."""
    eff = hw.efficiency
    n = device_scale(hw, settings.tensor_parallel)
    flops = hw.flops(settings.dtype) * eff.matmul * n
    bw = hw.memory_bandwidth * eff.memory * n
    per_token = 2.0 * shape.active_params_per_token / flops
    per_pair = 4.0 * shape.num_layers * shape.num_heads * shape.head_dim / flops
    kv = shape.kv_bytes_per_token(settings.kv_dtype) / bw
    weights = shape.weight_bytes(settings.dtype) / bw
    routed = shape.routed_params * DTYPE_BYTES.get(settings.dtype, 2) / bw
    compute = (0.0, per_token, per_pair, per_token, per_pair)
    memory = (weights, kv, 0.0, kv, kv)
    where = "measured" if hw.provenance == MEASURED else "datasheet"
    return StepTimeModel(
        forms=(compute, memory), overhead_s=eff.step_overhead_s, provenance=DERIVED,
        routed_s=routed, expert_pass=shape.expert_pass_probability if routed else 0.0,
        source=f"roofline of {shape.name} on {settings.tensor_parallel}x {hw.key} "
               f"({where} figures; {eff.describe()})")


def kv_bytes_per_token(shape: ModelShape, settings: EngineSettings) -> int:
    return shape.kv_bytes_per_token(settings.kv_dtype)


def weights_fit(shape: ModelShape, hw: Hardware, settings: EngineSettings) -> bool:
    per_device = shape.num_params * DTYPE_BYTES.get(settings.dtype, 2) / settings.tensor_parallel
    return per_device < hw.memory_bytes
