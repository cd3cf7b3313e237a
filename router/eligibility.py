"""Which replicas may take a request at all, and why none can.

A replica is usable for a request when it serves the request's model, is
healthy, is not draining, has stats younger than ``stats_ttl_s``, and has
not already refused this request. A decode replica must also fit the
request: blocks for ``RouteRequest.kv_tokens`` (prompt + expected output)
and a batch slot not promised to
its waiting requests. These two predicates are the only statement of the
rules; the explanation of an empty result runs only when about to raise.
"""

from __future__ import annotations

from splitserve.router.config import RouterConfig
from splitserve.router.types import (
    ClusterSnapshot,
    DecodeReplicaStats,
    NoCapacityError,
    PrefillReplicaStats,
    RouteRequest,
)


def prefill_usable(
    p: PrefillReplicaStats, model: str, horizon: float, excluded: frozenset[str]
) -> bool:
    """``horizon``: oldest acceptable ``updated_at`` (now - stats_ttl_s)."""
    return (
        p.model == model
        and p.healthy
        and not p.draining
        and p.updated_at >= horizon
        and p.replica_id not in excluded
    )


def decode_usable(
    d: DecodeReplicaStats, model: str, horizon: float, excluded: frozenset[str], total_tokens: int
) -> bool:
    """``total_tokens``: ``RouteRequest.kv_tokens`` of the request."""
    return (
        d.model == model
        and d.healthy
        and not d.draining
        and d.updated_at >= horizon
        and d.replica_id not in excluded
        and d.free_blocks * d.block_size >= total_tokens  # free_blocks >= blocks needed
        and d.running_seqs + d.waiting_requests < d.max_seqs
    )


def no_decode_capacity(req: RouteRequest, snap: ClusterSnapshot, cfg: RouterConfig) -> NoCapacityError:
    """The error to raise when no decode replica is usable, saying why for each."""
    horizon = snap.now - cfg.stats_ttl_s
    of_model = [d for d in snap.decode if d.model == req.model]
    if not of_model:
        return NoCapacityError(
            f"no decode replica of model {req.model!r} has reported stats; "
            "deploy decode replicas for it or wait for them to start",
            req.model,
        )
    why: dict[str, int] = {}
    for d in of_model:
        reason = _decode_refusal(req, d, horizon)
        why[reason] = why.get(reason, 0) + 1
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(why.items()))
    return NoCapacityError(
        f"no decode replica of model {req.model!r} can take request {req.request_id!r} "
        f"({req.prompt_len} prompt + {req.kv_tokens - req.prompt_len} new tokens): {parts} "
        f"(stats older than {cfg.stats_ttl_s} s are stale). "
        "Retry later, lower max_tokens, or add decode replicas.",
        req.model,
    )


def _decode_refusal(req: RouteRequest, d: DecodeReplicaStats, horizon: float) -> str:
    if d.replica_id in req.exclude_replicas:
        return "already refused this request"
    if not d.healthy:
        return "unhealthy"
    if d.draining:
        return "draining"
    if d.updated_at < horizon:
        return "stale"
    if d.free_blocks * d.block_size < req.kv_tokens:
        return "short of free KV blocks"
    if d.running_seqs + d.waiting_requests >= d.max_seqs:
        return "batch full"
    return "usable"  # not reached when called for an empty usable set
