"""What a worker replica reports about itself: typed, and torch-free.

``LLMEngine.load_stats`` returns an ``EngineLoad``; the prefill worker wraps
it in ``PrefillStats``, the decode worker (decode and colocated roles) in
``DecodeStats``. The worker's ``Stats`` RPC, the replica's push to the
router (``splitserve.router.reports``), its Prometheus metrics
(``splitserve.cluster.observability.metrics``) and its autoscaling metrics
(``splitserve.cluster.autoscaling.signals``) all read these types, so a
missing or misspelt field fails where it is built, never becomes a 0 where
it is read. Counters are cumulative since the replica started.

On the wire (the ``Stats`` RPC's msgpack map) a ``WorkerStats`` carries its
kind in the ``kind`` field: ``stats_to_wire`` / ``stats_from_wire``.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec


class EngineLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One engine's load and its per-request state, read on its thread."""

    pending_prompt_tokens: int  # queued and running prompt tokens not yet computed
    running: int  # sequences in the running batch
    waiting: int  # sequences queued, not yet scheduled
    max_seqs: int  # the engine's max_num_seqs
    free_blocks: int
    total_blocks: int
    block_size: int  # tokens per KV block
    busy_time_s: float  # seconds spent in engine steps
    steps: int  # engine steps run
    prompt_tokens_computed: int  # prompt tokens computed in multi-token (prefill) steps
    preemptions: int
    prefix_hits: int  # prefix-cache lookups that found a cached block
    prefix_queries: int
    cached_blocks: int  # blocks the prefix cache holds
    # per-request state: all 0 on an idle engine (the leak checks read them)
    open_requests: int
    block_owners: int
    # LoRA: device slots (0: the engine serves no adapters), those a running
    # sequence holds, and the adapters (their keys, AdapterRef.key) in slots
    # and in host memory; defaults for engines that serve none
    lora_slots: int = 0
    lora_slots_in_use: int = 0
    adapters: tuple[str, ...] = ()
    host_adapters: tuple[str, ...] = ()
    # speculative decoding (splitserve.engine.spec), cumulative; all 0 without it
    spec_drafts: int = 0  # sequence-steps that verified at least one draft token
    spec_draft_tokens: int = 0  # draft tokens verified
    spec_accepted_tokens: int = 0  # of those, accepted
    spec_draft_time_s: float = 0.0  # seconds spent proposing drafts

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted draft tokens per verified draft token (0 without any)."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verify step yields per sequence: 1 + accepted drafts (0 without any)."""
        return 1.0 + self.spec_accepted_tokens / self.spec_drafts if self.spec_drafts else 0.0

    @property
    def queued(self) -> int:
        """Sequences the engine holds, running or waiting."""
        return self.running + self.waiting

    def idle(self) -> bool:
        """Nothing left behind: every block free and no request state."""
        return (self.free_blocks == self.total_blocks and self.open_requests == 0
                and self.block_owners == 0)


class PrefillStats(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="prefill"):
    """``PrefillWorker.stats()``."""

    engine: EngineLoad
    streams: int  # engine output streams open
    inflight: int  # prompts being prefilled or handed off now
    completed: int  # hand-offs done
    failed: int  # hand-offs that failed
    bytes_sent: int  # KV bytes handed off

    def in_flight(self) -> int:
        """Requests this replica still works on (a draining replica waits for 0)."""
        return self.engine.queued + self.inflight

    def idle(self) -> bool:
        """Nothing left behind: the engine idle, no stream, no outgoing hand-off."""
        return self.engine.idle() and self.streams == 0 and self.inflight == 0


class DecodeStats(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="decode"):
    """``DecodeWorker.stats()`` (the decode and colocated roles)."""

    engine: EngineLoad
    streams: int  # engine output streams open
    reservations: int  # hand-off reservations waiting for their KV
    handoffs: int  # prompts received from prefill replicas
    local_prefills: int  # prompts prefilled here
    fallbacks: int  # remote prefills that failed and ran here instead
    refused: int  # reservations refused (blocks full)
    expired: int  # reservations whose lease ran out
    handoff_bytes: int  # KV bytes received
    kv_endpoint: str  # where prefill replicas send this replica's KV

    def in_flight(self) -> int:
        """Requests this replica still works on (a draining replica waits for 0)."""
        return self.engine.queued + self.reservations

    def idle(self) -> bool:
        """Nothing left behind: the engine idle, no stream, no open reservation."""
        return self.engine.idle() and self.streams == 0 and self.reservations == 0


WorkerStats = Union[PrefillStats, DecodeStats]


def stats_to_wire(stats: WorkerStats) -> dict[str, Any]:
    """The msgpack-ready map of ``stats`` (the ``Stats`` RPC's reply)."""
    return msgspec.to_builtins(stats)


def stats_from_wire(msg: dict[str, Any]) -> WorkerStats:
    """A ``Stats`` RPC reply as its type; raises ``msgspec.ValidationError``
    naming the field when one is missing, misspelt or of the wrong type."""
    return msgspec.convert(msg, WorkerStats)
