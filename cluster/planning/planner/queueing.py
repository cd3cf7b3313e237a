"""Queueing formulas of the estimate, vectorised over numpy arrays: the
normal distribution, Erlang B (loss) and C (waiting) systems, and the
waiting time of an M/G/c queue with an exponential tail."""

from __future__ import annotations

import math

import numpy as np

INF = float("inf")


def _norm_cdf(x):
    # Abramowitz-Stegun 7.1.26 on erf, |error| < 1.5e-7
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-z * z)
    return 0.5 * (1.0 + np.sign(x) * y)


def _norm_pdf(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def erlang_b(c, a):
    """Blocking of a loss system of ``c`` servers offered ``a`` erlangs (normal
    approximation, Jagerman): phi(b) / (sqrt(a) Phi(b)), b = (c - a) / sqrt(a)."""
    a = np.maximum(a, 1e-12)
    s = np.sqrt(a)
    with np.errstate(invalid="ignore", over="ignore"):
        b = np.nan_to_num((c - a) / s, nan=-40.0, posinf=40.0, neginf=-40.0)
    return np.clip(_norm_pdf(b) / (s * np.maximum(_norm_cdf(b), 1e-300)), 0.0, 1.0)


def erlang_c(c, a, cmax: int):
    """P(wait) of M/M/c offered ``a`` erlangs (a < c), exactly, for integer c <= cmax."""
    a = np.asarray(a, dtype=np.float64)
    c = np.broadcast_to(c, a.shape)
    b = np.ones_like(a)
    out = np.zeros_like(a)
    for k in range(1, cmax + 1):
        b = a * b / (k + a * b)
        hit = c == k
        if hit.any():
            bk = b[hit]
            ak = a[hit]
            out[hit] = k * bk / np.maximum(k - ak * (1 - bk), 1e-12)
    return np.clip(out, 0.0, 1.0)


def mgc_wait(rho, mean_t, cv2, c, cmax: int, pct: float):
    """M/G/c waiting time: mean and the ``pct`` percentile (exponential tail)."""
    a = np.minimum(rho, 0.999999) * c
    pw = erlang_c(c, a, cmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(rho < 1, pw * mean_t / (c * (1 - rho)) * (1 + cv2) / 2, INF)
        theta = np.where(pw > 0, w / pw, 0.0)
        tail = 1 - pct / 100
        wp = np.where(pw > tail, theta * np.log(np.maximum(pw, 1e-300) / tail), 0.0)
    return w, wp
