"""Receive buffers reused across chunks.

A fresh multi-MiB buffer per chunk costs a page fault per 4 KiB on first
touch (large allocations are fresh mmaps), which on loopback costs as much as
the copy itself. Sinks copy a chunk into their KV cache inside
``write_layers``, so the receiver takes the buffer back afterwards and
hands it to the next chunk of a similar size.
"""

from __future__ import annotations

import threading

import torch


class BufferPool:
    """Flat uint8 CPU buffers, kept up to ``max_bytes`` in total."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (reused when one fits within 2x)."""
        with self._lock:
            fits = [b for b in self._free if nbytes <= b.numel() <= 2 * nbytes]
            if fits:
                best = min(fits, key=torch.Tensor.numel)
                self._free = [b for b in self._free if b is not best]
                return best
        return torch.empty(nbytes, dtype=torch.uint8)  # [nbytes]

    def release(self, buf: torch.Tensor) -> None:
        """Give ``buf`` (as returned by acquire) back; the oldest buffers are
        dropped when the pool would exceed its limit."""
        if buf.numel() > self.max_bytes:
            return
        with self._lock:
            if any(b is buf for b in self._free):
                return
            self._free.append(buf)
            while sum(b.numel() for b in self._free) > self.max_bytes:
                self._free.pop(0)

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)
