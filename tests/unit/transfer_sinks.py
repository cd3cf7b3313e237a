"""KV sinks for the transfer tests: the decode side's contract over a real
paged KV cache (``CacheSink``) or over raw chunks of any dtype
(``RecordingSink``), with reservations, byte allowances and a gate that can
hold ``write_layers`` to stand for a receiver that never answers."""

from __future__ import annotations

import threading

import torch

from splitserve.handoff.transfer.base import ChunkHeader, KVSink
from splitserve.handoff.transfer.errors import UnknownHandoffError
from splitserve.kernels import ops


class RecordingSink(KVSink):
    """Keeps a copy of every chunk it is given, per hand-off."""

    def __init__(self):
        self.allowed: dict[str, int] = {}
        self.chunks: dict[str, list[tuple[ChunkHeader, torch.Tensor]]] = {}
        self.gate: threading.Event | None = None  # when set: write_layers waits for it
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def reserve(self, handoff_id: str, nbytes: int) -> None:
        self.allowed[handoff_id] = nbytes

    def expect(self, handoff_id: str) -> int:
        if handoff_id not in self.allowed:
            raise UnknownHandoffError(f"no live reservation for hand-off {handoff_id!r}")
        return self.allowed[handoff_id]

    def write_layers(self, header: ChunkHeader, buf: torch.Tensor) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        with self._lock:
            self.allowed[header.handoff_id] -= header.nbytes
            self.chunks.setdefault(header.handoff_id, []).append((header, buf.clone()))

    def received(self, handoff_id: str) -> list[torch.Tensor]:
        return [b for _, b in self.chunks.get(handoff_id, [])]


class CacheSink(KVSink):
    """Scatters chunks into reserved blocks of a KV cache with unpack_kv, as
    the decode engine does."""

    def __init__(self, kv_cache: torch.Tensor):
        self.kv_cache = kv_cache  # [L, 2, NB, BS, Hk, D]
        self.blocks: dict[str, torch.Tensor] = {}
        self.layers: dict[str, set[int]] = {}

    def reserve(self, handoff_id: str, block_ids: list[int]) -> None:
        self.blocks[handoff_id] = torch.tensor(block_ids, dtype=torch.int64)
        self.layers[handoff_id] = set()

    def expect(self, handoff_id: str) -> int:
        if handoff_id not in self.blocks:
            raise UnknownHandoffError(f"no live reservation for hand-off {handoff_id!r}")
        per_layer = self.kv_cache[0, :, :1].numel() * self.kv_cache.element_size()
        return per_layer * len(self.blocks[handoff_id]) * self.kv_cache.shape[0]

    def write_layers(self, header: ChunkHeader, buf: torch.Tensor) -> None:
        ops.unpack_kv(buf, self.kv_cache, self.blocks[header.handoff_id], header.layer_start)
        self.layers[header.handoff_id].update(range(header.layer_start, header.layer_end))
