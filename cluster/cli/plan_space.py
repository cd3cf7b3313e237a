"""The search space of ``splitserve plan``, from its flags: each value one
the operator config takes (block sizes, replicas per pool) and, for
``--tensor-parallel``, one the model's shape splits over; a bad value is a
ValueError naming the flag, before any search."""

from __future__ import annotations

from splitserve.cluster.cli.common import int_list, str_list

LAYOUTS = ("colocated", "disaggregated")
KV_DTYPES = ("auto", "fp8")
WEIGHT_DTYPES = ("bfloat16", "float16", "fp8")
POLICIES = ("cost", "prefix_aware", "least_loaded", "round_robin")


def _speculative(value: str) -> bool:
    method, sep, k = value.partition(":")
    return value == "off" or (bool(method) and sep == ":" and k.isdigit() and int(k) >= 1)


def space_from_args(args, shape):
    """The search space the flags describe, each value one the operator
    config takes and, for --tensor-parallel, one ``shape`` splits over;
    ValueError naming the flag."""
    from splitserve.cluster.planning.planner.space import AUTOSCALING, SpaceSpec, tp_splits

    blocks = int_list("--block-sizes", args.block_sizes)
    bad = [b for b in blocks if b > 256 or b & (b - 1)]
    if bad:
        raise ValueError(f"--block-sizes {args.block_sizes!r}: block sizes are powers of two "
                         f"up to 256, got {bad[0]}")
    tps = int_list("--tensor-parallel", args.tensor_parallel)
    if not any(tp_splits(shape, t) for t in tps):
        raise ValueError(f"--tensor-parallel {args.tensor_parallel!r}: {shape.name} splits over "
                         f"none of these ({shape.num_heads} attention heads, "
                         f"{shape.num_kv_heads} KV heads, intermediate size "
                         f"{shape.intermediate_size})")
    return SpaceSpec(
        layouts=str_list("--layouts", args.layouts, LAYOUTS),
        max_num_seqs=int_list("--max-num-seqs", args.max_num_seqs),
        max_num_batched_tokens=int_list("--max-num-batched-tokens", args.max_num_batched_tokens,
                                        minimum=16),
        block_sizes=blocks,
        kv_dtypes=str_list("--kv-dtypes", args.kv_dtypes, KV_DTYPES),
        weight_dtypes=str_list("--weight-dtypes", args.weight_dtypes, WEIGHT_DTYPES),
        tensor_parallel=tps,
        speculative=str_list("--speculative", args.speculative, _speculative,
                             "off or METHOD:K, e.g. ngram:4"),
        policies=str_list("--policies", args.policies, POLICIES),
        local_prefill=int_list("--local-prefill", args.local_prefill, minimum=0),
        autoscaling=str_list("--autoscaling", args.autoscaling, AUTOSCALING),
        max_replicas=_max_replicas(args.max_replicas), spec_acceptance=args.spec_acceptance)


def _max_replicas(n: int) -> int:
    """``--max-replicas`` within what a pool of the emitted config may hold."""
    from splitserve.cluster.config.models import MAX_REPLICAS

    if n > MAX_REPLICAS:
        raise ValueError(f"--max-replicas {n}: a pool holds at most {MAX_REPLICAS} replicas")
    return n
