"""Placement policies, chosen by name from ``POLICIES``.

Each policy is a pure function
``(req, snap, index_matches, cfg, state) -> Placement``: ``index_matches``
maps replica id -> leading prompt blocks it caches (``PrefixIndex.match``),
``state`` is the ``PolicyState`` the caller keeps between decisions. A
policy raises NoCapacityError when no decode replica can take the request;
when no prefill replica is usable it prefills on the decode replica.
Ties always break on the smaller replica id, so decisions are reproducible.

- ``cost`` (default): the decode replica with the lowest load minus prefix
  credit; then the prefill replica with the smallest predicted remote TTFT
  into it, against local prefill on it; the cheaper wins. Local prefill is
  only allowed when the prompt's uncached part is within
  ``local_prefill_max_tokens``, and is taken whenever allowed while
  ``prefer_local_prefill`` is on (config or state).
- ``prefix_aware``: the prefill replica caching the most of the prompt
  among those whose queue is within ``prefix_max_extra_queue_s`` of the
  shortest; decode as in ``cost``. Always remote.
- ``least_loaded``: shortest prefill queue, least loaded decode replica.
- ``round_robin``: cycles through each model's usable replicas in id order.
"""

from __future__ import annotations

from typing import Callable, Mapping

from splitserve.engine.roles import Role
from splitserve.router.config import RouterConfig
from splitserve.router.cost_model import local_ttft_s, remote_ttft_s, usable_hit_tokens
from splitserve.router.eligibility import decode_usable, no_decode_capacity, prefill_usable
from splitserve.router.selection import (
    fastest_remote_prefill,
    longest_prefix_prefill,
    next_in_cycle,
    pick_decode,
    shortest_queue_prefill,
)
from splitserve.router.types import (
    REASON_LEAST_LOADED,
    REASON_LOCAL_CHEAPER,
    REASON_LOCAL_OVER_LIMIT,
    REASON_LOCAL_PREFERRED,
    REASON_NO_PREFILL_REPLICA,
    REASON_PREFIX_HIT,
    REASON_REMOTE_CHEAPER,
    REASON_ROUND_ROBIN,
    ClusterSnapshot,
    DecodeReplicaStats,
    Placement,
    PolicyState,
    PrefillReplicaStats,
    RouteRequest,
    RouterConfigError,
)

PolicyFn = Callable[
    [RouteRequest, ClusterSnapshot, Mapping[str, int], RouterConfig, PolicyState], Placement
]


def _placement(
    req: RouteRequest,
    p: PrefillReplicaStats | None,
    d: DecodeReplicaStats,
    matches: Mapping[str, int],
    cfg: RouterConfig,
    reason: str,
    ttft: float | None = None,
    hit: int | None = None,
) -> Placement:
    """``req`` on (p, d), p None meaning local prefill on d, with the cost
    model's TTFT for that pair whichever policy chose it (``ttft``: that
    TTFT when the caller has already worked it out; ``hit``: likewise the
    usable cached tokens on the replica that prefills)."""
    if hit is None:
        runner = d if p is None else p
        hit = usable_hit_tokens(matches.get(runner.replica_id, 0), req.prompt_len,
                                cfg.model(req.model).block_size)
    if ttft is None:
        uncached = req.prompt_len - hit
        if p is None:
            ttft = local_ttft_s(d, uncached, cfg)
        else:
            ttft = remote_ttft_s(p, d, req.prompt_len, uncached,
                                 cfg.model(req.model).kv_bytes_per_token, cfg)
    return Placement(
        prefill_replica=None if p is None else p.replica_id,
        decode_replica=d.replica_id,
        reason=reason,
        predicted_ttft_s=ttft,
        prefix_hit_tokens=hit,
    )


def cost_policy(req: RouteRequest, snap: ClusterSnapshot, matches: Mapping[str, int],
                cfg: RouterConfig, state: PolicyState) -> Placement:
    facts = cfg.model(req.model)
    d = pick_decode(req, snap, matches, cfg, cfg.prefix_weight)
    p, remote_s = fastest_remote_prefill(req, snap, matches, cfg, d, facts)
    if p is None:
        return _placement(req, None, d, matches, cfg, REASON_NO_PREFILL_REPLICA)
    prompt_len = req.prompt_len
    hit = usable_hit_tokens(matches.get(d.replica_id, 0), prompt_len, facts.block_size)
    local_uncached = prompt_len - hit
    local_allowed = local_uncached <= cfg.local_prefill_max_tokens
    # local_ttft_s(d, local_uncached, cfg), inline (once per placement): the same sums
    speed = d.prefill_tokens_per_s
    local_s = ((d.pending_prefill_tokens + local_uncached)
               / (speed if speed > 0 else cfg.assumed_prefill_tokens_per_s) + d.decode_step_s)
    if local_allowed and (cfg.prefer_local_prefill or state.prefer_local_prefill):
        return _placement(req, None, d, matches, cfg, REASON_LOCAL_PREFERRED, local_s, hit)
    if local_s <= remote_s:
        if local_allowed:
            return _placement(req, None, d, matches, cfg, REASON_LOCAL_CHEAPER, local_s, hit)
        return _placement(req, p, d, matches, cfg, REASON_LOCAL_OVER_LIMIT, remote_s)
    return _placement(req, p, d, matches, cfg, REASON_REMOTE_CHEAPER, remote_s)


def prefix_aware_policy(req: RouteRequest, snap: ClusterSnapshot, matches: Mapping[str, int],
                        cfg: RouterConfig, state: PolicyState) -> Placement:
    d = pick_decode(req, snap, matches, cfg, cfg.prefix_weight)
    p = longest_prefix_prefill(req, snap, matches, cfg)
    if p is None:
        return _placement(req, None, d, matches, cfg, REASON_NO_PREFILL_REPLICA)
    reason = REASON_PREFIX_HIT if matches.get(p.replica_id, 0) else REASON_LEAST_LOADED
    return _placement(req, p, d, matches, cfg, reason)


def least_loaded_policy(req: RouteRequest, snap: ClusterSnapshot, matches: Mapping[str, int],
                        cfg: RouterConfig, state: PolicyState) -> Placement:
    d = pick_decode(req, snap, matches, cfg, prefix_weight=0.0)
    p, _ = shortest_queue_prefill(req, snap, cfg)
    if p is None:
        return _placement(req, None, d, matches, cfg, REASON_NO_PREFILL_REPLICA)
    return _placement(req, p, d, matches, cfg, REASON_LEAST_LOADED)


def round_robin_policy(req: RouteRequest, snap: ClusterSnapshot, matches: Mapping[str, int],
                       cfg: RouterConfig, state: PolicyState) -> Placement:
    model, excluded = req.model, req.exclude_replicas
    horizon = snap.now - cfg.stats_ttl_s
    total = req.kv_tokens
    d = next_in_cycle(
        state,
        (model, Role.DECODE),
        snap.decode,
        lambda d: decode_usable(d, model, horizon, excluded, total),
    )
    if d is None:
        raise no_decode_capacity(req, snap, cfg)
    p = next_in_cycle(
        state, (model, Role.PREFILL), snap.prefill, lambda p: prefill_usable(p, model, horizon, excluded)
    )
    if p is None:
        return _placement(req, None, d, matches, cfg, REASON_NO_PREFILL_REPLICA)
    return _placement(req, p, d, matches, cfg, REASON_ROUND_ROBIN)


POLICIES: dict[str, PolicyFn] = {
    "cost": cost_policy,
    "prefix_aware": prefix_aware_policy,
    "least_loaded": least_loaded_policy,
    "round_robin": round_robin_policy,
}


def get_policy(name: str) -> PolicyFn:
    policy = POLICIES.get(name)
    if policy is None:
        raise RouterConfigError(f"unknown router policy {name!r}; choose one of {sorted(POLICIES)}")
    return policy
