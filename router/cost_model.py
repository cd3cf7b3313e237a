"""Time-to-first-token and load estimates the policies compare.

A request with a LoRA adapter also pays for bringing its adapter into a
replica's device slot where it is not there yet (``adapter_miss``).

Remote prefill: the prefill replica's queue drains at its measured speed,
then it computes the uncached part of the prompt, then the prompt's KV
crosses the link to the decode replica. Local prefill: the decode replica
drains its own prefill queue, computes the uncached part at its local
speed, and waits for the decode step already running. Every constant comes
from ``RouterConfig``; every input from pushed replica stats.
"""

from __future__ import annotations

from splitserve.router.config import RouterConfig
from splitserve.router.types import DecodeReplicaStats, PrefillReplicaStats


def usable_hit_tokens(matched_blocks: int, prompt_len: int, block_size: int) -> int:
    """Cached prompt tokens a replica can reuse. The engine computes at least
    the prompt's last token (its logits give the first output token), so at
    most ``(prompt_len - 1) // block_size`` cached blocks count."""
    cap = (prompt_len - 1) // block_size
    # min(matched_blocks, cap), written out: the builtin costs more than the rest
    return (cap if cap < matched_blocks else matched_blocks) * block_size


def prefill_speed(measured_tokens_per_s: float, cfg: RouterConfig) -> float:
    """Measured speed, or the configured assumption before the first measurement."""
    return measured_tokens_per_s if measured_tokens_per_s > 0 else cfg.assumed_prefill_tokens_per_s


def prefill_queue_s(p: PrefillReplicaStats, cfg: RouterConfig) -> float:
    """Seconds until a new prompt starts on ``p``: its pending tokens at its speed."""
    return p.pending_prompt_tokens / prefill_speed(p.prefill_tokens_per_s, cfg)


def local_queue_s(d: DecodeReplicaStats, cfg: RouterConfig) -> float:
    """Seconds until a new prompt starts prefilling on decode replica ``d``:
    its own prefill queue at its local speed."""
    return d.pending_prefill_tokens / prefill_speed(d.prefill_tokens_per_s, cfg)


def remote_prefill_s(p: PrefillReplicaStats, uncached_tokens: int, cfg: RouterConfig) -> float:
    """Queue delay on ``p`` plus computing the prompt's uncached part there."""
    return (p.pending_prompt_tokens + uncached_tokens) / prefill_speed(p.prefill_tokens_per_s, cfg)


def transfer_s(
    prompt_len: int, kv_bytes_per_token: int, same_node: bool, cfg: RouterConfig
) -> float:
    """Moving the whole prompt's KV from prefill to decode, plus the fixed
    hand-off overhead."""
    bandwidth = cfg.same_node_bytes_per_s if same_node else cfg.network_bytes_per_s
    return prompt_len * kv_bytes_per_token / bandwidth + cfg.handoff_overhead_s


def same_node(p: PrefillReplicaStats, d: DecodeReplicaStats) -> bool:
    return bool(p.node_id) and p.node_id == d.node_id


def remote_ttft_s(
    p: PrefillReplicaStats,
    d: DecodeReplicaStats,
    prompt_len: int,
    uncached_tokens: int,
    kv_bytes_per_token: int,
    cfg: RouterConfig,
) -> float:
    return remote_prefill_s(p, uncached_tokens, cfg) + transfer_s(
        prompt_len, kv_bytes_per_token, same_node(p, d), cfg
    )


def local_ttft_s(d: DecodeReplicaStats, uncached_tokens: int, cfg: RouterConfig) -> float:
    """Prefill on the decode replica: its prefill queue and the uncached part
    at its local speed, after the decode step in progress."""
    speed = prefill_speed(d.prefill_tokens_per_s, cfg)
    return (d.pending_prefill_tokens + uncached_tokens) / speed + d.decode_step_s


def decode_blocks_needed(d: DecodeReplicaStats, kv_tokens: int) -> int:
    """Blocks a sequence of ``kv_tokens`` (prompt + expected output,
    ``RouteRequest.kv_tokens``) occupies on ``d``. Cached prefix blocks are
    not subtracted: they may sit in the free list themselves. (How loaded a
    decode replica is: ``DecodeReplicaStats.load``.)"""
    return -(-kv_tokens // d.block_size)


def adapter_miss(replica: PrefillReplicaStats | DecodeReplicaStats, adapter: str | None) -> float:
    """How far ``replica`` is from running a request of LoRA adapter
    ``adapter``: 0 with it in a device slot (or no adapter), 0.5 with it in
    host memory only, 1 without it (read from disk first). The policies
    scale it by ``RouterConfig.adapter_miss_weight`` (decode load) or
    ``adapter_load_s`` (prefill time)."""
    if adapter is None or adapter in replica.adapters:
        return 0.0
    return 0.5 if adapter in replica.host_adapters else 1.0
