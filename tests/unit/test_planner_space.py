"""The planner's search space: its size is counted without enumerating it,
and settings the engine does not run are modelled-only."""

import itertools

from splitserve.cluster.config import ModelSpec
from splitserve.cluster.planning.planner.space import (
    SpaceSpec, engine_grid, engine_support, router_options, space_size)

SMALL = SpaceSpec(max_num_seqs=(32, 64), max_num_batched_tokens=(512, 2048), block_sizes=(16,),
                  kv_dtypes=("auto", "fp8"), weight_dtypes=("bfloat16", "fp8"),
                  tensor_parallel=(1, 2), speculative=("off", "ngram:4", "ngram:8"),
                  policies=("cost", "prefix_aware", "round_robin"), local_prefill=(0, 256),
                  autoscaling=("fixed", "burst"), max_replicas=3)


def brute_force(space: SpaceSpec, counts: list[int]) -> tuple[int, int]:
    grid = engine_grid(space)
    sup = engine_support()
    dep = total = 0
    n_dev = range(len(counts))
    for layout in space.layouts:
        routers = router_options(space, layout)
        pools = []
        if layout == "colocated":
            for d, tp in itertools.product(n_dev, space.tensor_parallel):
                for r in range(1, space.max_replicas + 1):
                    if r * tp <= counts[d]:
                        pools.append(((d, tp, r),))
        else:
            for dp, tpp, dd, tpd in itertools.product(n_dev, space.tensor_parallel, n_dev,
                                                      space.tensor_parallel):
                for p, q in itertools.product(range(1, space.max_replicas + 1), repeat=2):
                    if p * tpp > counts[dp] or q * tpd > counts[dd]:
                        continue
                    if dp == dd and p * tpp + q * tpd > counts[dp]:
                        continue
                    pools.append(((dp, tpp, p), (dd, tpd, q)))
        # a disaggregated plan's prefill pool has a chunk size of its own
        chunks = [None] if layout == "colocated" else space.max_num_batched_tokens
        for pool, e, _, _, _ in itertools.product(pools, range(len(grid)), chunks, routers,
                                                  space.autoscaling):
            total += 1
            if grid.deployable[e] and all(tp in sup["tensor_parallel"] for _, tp, _ in pool):
                dep += 1
    return dep, total


def test_space_size_matches_enumeration():
    counts = [4, 3]
    size = space_size(SMALL, counts)
    dep, total = brute_force(SMALL, counts)
    assert size["deployable"] == dep
    assert size["total"] == total
    assert size["modelled_only"] == total - dep > 0


def test_unsupported_settings_are_modelled_only():
    sup = engine_support()
    # tensor parallelism, bf16 and fp8 weights, n-gram speculation up to 4 tokens
    # (today's ModelSpec); ngram:8 stays modelled-only
    assert ("weight_dtype" in ModelSpec.model_fields) == ("fp8" in sup["weight_dtype"])
    assert sup["tensor_parallel"] == {1, 2, 4, 8}
    assert sup["speculative"] == {"off", "ngram:2", "ngram:4"}
    assert sup["kv_cache_dtype"] == {"auto", "fp8"}
    grid = engine_grid(SMALL)
    for k in range(len(grid)):
        expected = (SMALL.weight_dtypes[grid.wd[k]] in sup["weight_dtype"]
                    and SMALL.speculative[grid.spec[k]] in sup["speculative"])
        assert grid.deployable[k] == expected


def test_router_options_count_the_threshold_only_where_read():
    dis = router_options(SMALL, "disaggregated")
    assert [(o.policy, o.local_prefill_max_tokens) for o in dis] == [
        ("cost", 0), ("cost", 256), ("prefix_aware", 0), ("round_robin", 0)]
    col = router_options(SMALL, "colocated")
    assert [o.policy for o in col] == ["cost", "round_robin"]  # prefix_aware places as cost


def test_a_realistic_request_has_over_100k_deployable_combinations():
    size = space_size(SpaceSpec(), [16, 16, 16])
    assert size["deployable"] >= 100_000
