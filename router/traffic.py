"""Which variant of a route serves a request: pure functions over a route's
weights (``RouteWeights``), no I/O.

With a client key (the OpenAI ``user`` field, a header, gRPC metadata) the
pick is sticky: weighted rendezvous hashing. Each variant scores
``weight / -ln(u)``, where ``u`` in (0, 1) is a hash of (key, variant), and
the highest score wins. That score is an exponential race in which variant
i wins with probability ``w_i / sum(w)`` exactly, the same key always gets
the same variant while the weights stay the same, and when one variant's
weight changes only keys won or lost by that variant move: raising a canary
from 10% to 20% moves about 1/9 of the others' keys to it and none between
the others. Without a key the pick is weighted random, from an injectable
``random.Random``.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from typing import Sequence

from splitserve.router.route_messages import RouteWeights

_TWO_64 = float(1 << 64)


def _unit(key: str, variant: str) -> float:
    """A uniform number in (0, 1) from (key, variant), the same in every process."""
    h = hashlib.blake2b(f"{key}\0{variant}".encode(), digest_size=8).digest()
    return (int.from_bytes(h, "big") + 0.5) / _TWO_64


def sticky_pick(key: str, variants: Sequence[str], weights: Sequence[float]) -> str:
    """The variant ``key`` is assigned while the weights stay these; raises
    ValueError when no weight is positive."""
    best, best_score = None, -1.0
    for name, w in zip(variants, weights):
        if w <= 0:
            continue
        score = w / -math.log(_unit(key, name))
        if score > best_score:
            best, best_score = name, score
    if best is None:
        raise ValueError("no variant has a positive weight")
    return best


def random_pick(rng: random.Random, variants: Sequence[str], weights: Sequence[float]) -> str:
    """A variant drawn with probability proportional to its weight."""
    cum = list(itertools.accumulate(max(0.0, w) for w in weights))
    if not cum or cum[-1] <= 0:
        raise ValueError("no variant has a positive weight")
    i = bisect.bisect_right(cum, rng.random() * cum[-1])
    i = min(i, len(cum) - 1)
    while weights[i] <= 0:  # rng.random() * total landed on a zero-width edge
        i -= 1
    return variants[i]


def pick(route: RouteWeights, key: str | None, rng: random.Random) -> str:
    """The variant of ``route`` that serves a request with client ``key``
    (None or empty: none sent, or the route is not sticky)."""
    if key and route.sticky:
        return sticky_pick(key, route.variants, route.weights)
    return random_pick(rng, route.variants, route.weights)


def split_percent(variants: Sequence[str], weights: Sequence[float], variant: str,
                  percent: float) -> tuple[float, ...]:
    """Weights that give ``variant`` ``percent`` of the traffic and share
    the rest among the others in proportion to ``weights`` (as percents)."""
    others = sum(w for n, w in zip(variants, weights) if n != variant)
    out = []
    for n, w in zip(variants, weights):
        if n == variant:
            out.append(float(percent))
        else:
            out.append((100.0 - percent) * w / others if others > 0 else 0.0)
    return tuple(out)
