"""When each request is sent: offsets in seconds from the run's start.

Inter-arrival gaps are gamma-distributed with shape ``burstiness`` and mean
1 / rate: burstiness 1 is a Poisson process at ``rate`` requests/s, below 1
the same mean rate in bursts, above 1 more even (the convention of vLLM's
serving benchmark). ``rate=inf`` sends everything at once; combined with a
concurrency limit that is a closed loop of ``concurrency`` clients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrivalSpec:
    rate: float = math.inf  # requests/s; inf: no pacing
    burstiness: float = 1.0  # gamma shape; 1: Poisson
    concurrency: int | None = None  # at most this many requests in flight
    seed: int = 0

    def __post_init__(self):
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (inf for no pacing), got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    def describe(self) -> str:
        pace = "all at once" if math.isinf(self.rate) else (
            f"Poisson {self.rate:g} req/s" if self.burstiness == 1.0
            else f"gamma {self.rate:g} req/s, burstiness {self.burstiness:g}")
        return pace + (f", concurrency {self.concurrency}" if self.concurrency else "")


def arrival_offsets(n: int, spec: ArrivalSpec) -> list[float]:
    """Send times of ``n`` requests, seconds after the start; the first
    request waits one gap too, as in a process that started before the run."""
    if math.isinf(spec.rate):
        return [0.0] * n
    rng = np.random.default_rng(spec.seed)
    scale = 1.0 / (spec.rate * spec.burstiness)  # mean gap = shape x scale = 1 / rate
    gaps = rng.gamma(spec.burstiness, scale, size=n)
    return [float(x) for x in np.cumsum(gaps)]
