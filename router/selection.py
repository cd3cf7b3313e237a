"""Finding the best replica of a pool without scoring every replica.

Each search first scores the replicas that cache part of the prompt (few,
found through ``index_matches``), then visits the others in ascending
(bound, replica id) order, the order the snapshot keeps them in by a stored
attribute the bound grows with: a decode replica's ``load`` (its exact
score when nothing is cached there), a prefill replica's ``queue_s`` (to
which the prompt's compute at the pool's fastest speed and the link add a
lower bound of its TTFT: the prefill replicas on the decode replica's node
are visited first with the same-node link, from the snapshot's per-node
view, then the others with the network's, so the cheaper link of a few
does not loosen the bound of all). The visit stops once the bound passes
the best score so far (or equals it at a larger id, which would lose the
tie), so a pool of any size usually costs a handful of evaluations (more
when the pool's measured speeds differ: idle replicas slower than the
fastest are then all visited). The result is the minimum over all usable
replicas, ties broken on the smaller replica id.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Callable, Mapping, Sequence, TypeVar

from splitserve.engine.roles import Role
from splitserve.router.config import ModelFacts, RouterConfig
from splitserve.router.cost_model import adapter_miss, prefill_queue_s, usable_hit_tokens
from splitserve.router.eligibility import decode_usable, no_decode_capacity, prefill_usable
from splitserve.router.types import (
    ClusterSnapshot,
    DecodeReplicaStats,
    PolicyState,
    PrefillReplicaStats,
    RouteRequest,
)

_ID = attrgetter("replica_id")
_INF = float("inf")

R = TypeVar("R", PrefillReplicaStats, DecodeReplicaStats)


def pick_decode(
    req: RouteRequest,
    snap: ClusterSnapshot,
    matches: Mapping[str, int],
    cfg: RouterConfig,
    prefix_weight: float,
) -> DecodeReplicaStats:
    """Usable decode replica with the lowest
    ``load - prefix_weight * cached fraction of the prompt
    + adapter_miss_weight * adapter_miss`` (the last term only for a request
    with a LoRA adapter); raises NoCapacityError when none is usable."""
    model, excluded, adapter = req.model, req.exclude_replicas, req.adapter
    miss_weight = cfg.adapter_miss_weight if adapter is not None else 0.0
    horizon = snap.now - cfg.stats_ttl_s
    total = req.kv_tokens
    best: DecodeReplicaStats | None = None
    best_score = _INF
    if matches and prefix_weight:
        get = snap.decode_by_id.get
        prompt_len = req.prompt_len
        credit_per_token = prefix_weight / prompt_len
        block_size = cfg.model(model).block_size
        # usable_hit_tokens(prompt_len, prompt_len, block_size) // block_size
        max_hit_blocks = (prompt_len - 1) // block_size
        # (the matches of the prefill pool are not in decode_by_id) A
        # replica is checked for use only when its score would win: the
        # same choice as filtering first, fewer calls.
        for rid, blocks in matches.items():
            d = get(rid)
            if d is None:
                continue
            hit = (blocks if blocks < max_hit_blocks else max_hit_blocks) * block_size
            score = d.load - credit_per_token * hit
            if miss_weight:
                score += miss_weight * adapter_miss(d, adapter)
            if ((score < best_score or (score == best_score and rid < best.replica_id))
                    and decode_usable(d, model, horizon, excluded, total)):
                best, best_score = d, score
    # Uncached replicas score their load (plus the adapter term, never
    # negative, so the load still bounds the score): without an adapter the
    # first usable one in (load, id) order is the best of them.
    for d in snap.decode_by_load:
        if d.load > best_score or (d.load == best_score and d.replica_id > best.replica_id):
            break
        if not decode_usable(d, model, horizon, excluded, total):
            continue
        if not miss_weight:
            best = d
            break
        score = d.load + miss_weight * adapter_miss(d, adapter)
        if score < best_score or (score == best_score and d.replica_id < best.replica_id):
            best, best_score = d, score
    if best is None:
        raise no_decode_capacity(req, snap, cfg)
    return best


def fastest_remote_prefill(
    req: RouteRequest,
    snap: ClusterSnapshot,
    matches: Mapping[str, int],
    cfg: RouterConfig,
    decode: DecodeReplicaStats,
    facts: ModelFacts,
) -> tuple[PrefillReplicaStats | None, float]:
    """Usable prefill replica with the smallest predicted TTFT when handing
    off to ``decode`` (``facts``: the request's model's; with ``adapter_load_s`` scaled by ``adapter_miss``
    for a request with a LoRA adapter), and that TTFT; (None, inf) when
    none is usable."""
    if not snap.prefill:
        return None, _INF
    model, excluded, adapter = req.model, req.exclude_replicas, req.adapter
    load_s = cfg.adapter_load_s if adapter is not None else 0.0
    horizon = snap.now - cfg.stats_ttl_s
    prompt_len = req.prompt_len
    # The cost model's remote TTFT, remote_ttft_s(), with its two possible
    # transfer times worked out once: the same sums in the same order.
    block_size, kv_bytes_per_token = facts.block_size, facts.kv_bytes_per_token
    max_hit_blocks = (prompt_len - 1) // block_size  # as in pick_decode
    assumed = cfg.assumed_prefill_tokens_per_s
    node = decode.node_id
    # transfer_s(prompt_len, kv_bytes_per_token, same_node, cfg), inline: the same sums
    kv_bytes, overhead_s = prompt_len * kv_bytes_per_token, cfg.handoff_overhead_s
    cross_s = kv_bytes / cfg.network_bytes_per_s + overhead_s
    same_s = kv_bytes / cfg.same_node_bytes_per_s + overhead_s if node else cross_s
    best: PrefillReplicaStats | None = None
    best_s = _INF
    if matches:
        get = snap.prefill_by_id.get
        for rid, blocks in matches.items():
            p = get(rid)
            if p is None:
                continue
            hit = (blocks if blocks < max_hit_blocks else max_hit_blocks) * block_size
            # remote_prefill_s(p, prompt_len - hit, cfg), inline: the same sums
            speed = p.prefill_tokens_per_s
            t = (p.pending_prompt_tokens + (prompt_len - hit)) / (speed if speed > 0 else assumed) + (
                same_s if node and p.node_id == node else cross_s
            )
            if load_s:
                t += load_s * adapter_miss(p, adapter)
            if ((t < best_s or (t == best_s and rid < best.replica_id))
                    and prefill_usable(p, model, horizon, excluded)):  # as in pick_decode
                best, best_s = p, t
    # Uncached replicas compute the whole prompt at no more than the pool's
    # fastest speed (or the assumed one): first those on the decode
    # replica's node (the same-node link), then the others (the network),
    # each in queue order with a bound of its own link, so neither visit
    # goes past the few replicas that could still win.
    # A replica is scored first and checked for use only when it would win
    # (most visited replicas do not): the same choice, fewer calls.
    fastest = snap.max_prefill_tokens_per_s
    compute_s = prompt_len / (assumed if assumed > fastest else fastest)  # max(fastest, assumed)
    local = snap.prefill_by_node.get(node, ()) if node else ()
    for group, link_s, skip_local in ((local, same_s, False),
                                      (snap.prefill_by_queue, cross_s, bool(local))):
        floor_s = compute_s + link_s
        for p in group:
            rid = p.replica_id
            bound = p.queue_s + floor_s
            if bound > best_s or (bound == best_s and rid > best.replica_id):
                break
            if skip_local and p.node_id == node:
                continue  # scored in the first visit
            # remote_prefill_s(p, prompt_len, cfg), inline: the same sums
            speed = p.prefill_tokens_per_s
            t = (p.pending_prompt_tokens + prompt_len) / (speed if speed > 0 else assumed) + link_s
            if load_s:
                t += load_s * adapter_miss(p, adapter)
            if ((t < best_s or (t == best_s and rid < best.replica_id))
                    and rid not in matches  # scored above, with their hits
                    and prefill_usable(p, model, horizon, excluded)):
                best, best_s = p, t
    return best, best_s


def shortest_queue_prefill(
    req: RouteRequest, snap: ClusterSnapshot, cfg: RouterConfig
) -> tuple[PrefillReplicaStats | None, float]:
    """Usable prefill replica with the smallest queue delay, and that delay;
    (None, inf) when none is usable."""
    if not snap.prefill:
        return None, _INF
    model, excluded = req.model, req.exclude_replicas
    horizon = snap.now - cfg.stats_ttl_s
    best: PrefillReplicaStats | None = None
    best_q = _INF
    for p in snap.prefill_by_queue:
        bound = p.queue_s  # exact once measured; 0 <= the assumed-speed queue before
        if bound > best_q or (bound == best_q and p.replica_id > best.replica_id):
            break
        if prefill_usable(p, model, horizon, excluded):
            q = prefill_queue_s(p, cfg)
            if q < best_q or (q == best_q and p.replica_id < best.replica_id):
                best, best_q = p, q
    return best, best_q


def longest_prefix_prefill(
    req: RouteRequest, snap: ClusterSnapshot, matches: Mapping[str, int], cfg: RouterConfig
) -> PrefillReplicaStats | None:
    """Among usable prefill replicas whose queue delay is within
    ``prefix_max_extra_queue_s`` of the shortest, the one caching the most
    of the prompt, then the shortest queue; None when none is usable."""
    shortest, shortest_q = shortest_queue_prefill(req, snap, cfg)
    if shortest is None:
        return None
    model, excluded = req.model, req.exclude_replicas
    horizon = snap.now - cfg.stats_ttl_s
    band = shortest_q + cfg.prefix_max_extra_queue_s
    block_size = cfg.model(model).block_size

    def key(p: PrefillReplicaStats, q: float) -> tuple[int, float, str]:
        hit = usable_hit_tokens(matches.get(p.replica_id, 0), req.prompt_len, block_size)
        return -hit, q, p.replica_id

    best, best_key = shortest, key(shortest, shortest_q)
    by_id = snap.prefill_by_id
    for rid in matches:
        p = by_id.get(rid)
        if p is None or not prefill_usable(p, model, horizon, excluded):
            continue
        q = prefill_queue_s(p, cfg)
        if q <= band and (k := key(p, q)) < best_key:
            best, best_key = p, k
    return best


def next_in_cycle(
    state: PolicyState, key: tuple[str, Role], replicas: Sequence[R], usable: Callable[[R], bool]
) -> R | None:
    """Next usable replica after the last pick, cycling in replica-id order;
    None when none is usable."""
    ordered = sorted(replicas, key=_ID)
    n = len(ordered)
    start = state.round_robin_next.get(key, 0)
    for step in range(n):
        i = (start + step) % n
        if usable(ordered[i]):
            state.round_robin_next[key] = i + 1
            return ordered[i]
    return None
