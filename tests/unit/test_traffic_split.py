"""Variant picks of a route (splitserve.router.traffic): shares match the
weights within statistical bounds that a wrong split fails, a client key
sticks to its variant, and a weight change moves only the keys it must."""

import math
import random

import pytest

from splitserve.router.route_messages import RouteWeights
from splitserve.router.traffic import pick, random_pick, split_percent, sticky_pick

N = 20000
KEYS = [f"user-{i}" for i in range(N)]


def chi_square(counts: dict[str, int], variants, weights) -> float:
    total = sum(counts.values())
    wsum = sum(weights)
    return sum((counts.get(v, 0) - total * w / wsum) ** 2 / (total * w / wsum)
               for v, w in zip(variants, weights) if w > 0)


# chi-square 0.999 quantiles by degrees of freedom: a correct split fails
# one run in a thousand; the inputs are fixed, so the result is too
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27}


def binomial_ok(hits: int, n: int, p: float, z: float = 4.0) -> bool:
    return abs(hits - n * p) <= z * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("weights", [(90, 10), (50, 30, 20), (1, 99), (70, 0, 30)])
def test_sticky_shares_follow_the_weights(weights):
    variants = [f"v{i}" for i in range(len(weights))]
    counts: dict[str, int] = {}
    for k in KEYS:
        v = sticky_pick(k, variants, weights)
        counts[v] = counts.get(v, 0) + 1
    df = sum(1 for w in weights if w > 0) - 1
    assert chi_square(counts, variants, weights) < CHI2_999[df], counts
    assert all(counts.get(v, 0) == 0 for v, w in zip(variants, weights) if w == 0)


def test_the_split_test_can_fail():
    """The bound rejects a split off by two points at this sample size."""
    counts = {"v0": int(N * 0.88), "v1": N - int(N * 0.88)}
    assert chi_square(counts, ["v0", "v1"], (90, 10)) > CHI2_999[1]


@pytest.mark.parametrize("weights", [(90, 10), (25, 25, 50)])
def test_random_shares_follow_the_weights(weights):
    variants = [f"v{i}" for i in range(len(weights))]
    rng = random.Random(1234)
    counts: dict[str, int] = {}
    for _ in range(N):
        v = random_pick(rng, variants, weights)
        counts[v] = counts.get(v, 0) + 1
    assert chi_square(counts, variants, weights) < CHI2_999[len(weights) - 1], counts


def test_a_key_keeps_its_variant_while_the_weights_stay():
    variants, weights = ("a", "b", "c"), (60, 30, 10)
    first = {k: sticky_pick(k, variants, weights) for k in KEYS[:2000]}
    for k in KEYS[:2000]:
        assert sticky_pick(k, variants, weights) == first[k]
    # the order the variants are listed in does not matter either
    assert all(sticky_pick(k, variants[::-1], weights[::-1]) == first[k] for k in KEYS[:2000])


def test_raising_a_canary_moves_only_keys_to_it_and_about_the_fewest():
    variants = ("stable", "canary")
    before = {k: sticky_pick(k, variants, (90, 10)) for k in KEYS}
    after = {k: sticky_pick(k, variants, (80, 20)) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == "stable" and after[k] == "canary" for k in moved)
    # the least that can move is 10% of the keys; consistent hashing moves that, not more
    assert binomial_ok(len(moved), N, 0.10), len(moved)
    assert binomial_ok(sum(v == "canary" for v in after.values()), N, 0.20)


def test_a_third_variant_changing_leaves_the_other_two_alone():
    variants = ("a", "b", "c")
    before = {k: sticky_pick(k, variants, (50, 40, 10)) for k in KEYS}
    after = {k: sticky_pick(k, variants, (50, 40, 30)) for k in KEYS}
    for k in KEYS:
        if before[k] != after[k]:
            assert after[k] == "c"  # keys only move to the variant that grew


def test_pick_uses_the_key_only_when_sticky():
    r = RouteWeights("r", ("a", "b"), (50.0, 50.0))
    rng = random.Random(0)
    assert len({pick(r, "alice", rng) for _ in range(50)}) == 1
    loose = RouteWeights("r", ("a", "b"), (50.0, 50.0), sticky=False)
    assert {pick(loose, "alice", rng) for _ in range(50)} == {"a", "b"}
    assert {pick(r, None, rng) for _ in range(50)} == {"a", "b"}


def test_no_positive_weight_is_refused():
    with pytest.raises(ValueError):
        sticky_pick("k", ["a"], [0.0])
    with pytest.raises(ValueError):
        random_pick(random.Random(0), ["a", "b"], [0.0, 0.0])


def test_split_percent_gives_the_rest_in_the_others_proportions():
    assert split_percent(("a", "b", "c"), (30, 10, 5), "c", 20) == (60.0, 20.0, 20.0)
    assert split_percent(("old", "new"), (1, 0), "new", 100) == (0.0, 100.0)
    assert split_percent(("old", "new"), (1, 0), "new", 0) == (100.0, 0.0)
