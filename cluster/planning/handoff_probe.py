"""Measure a KV transport's throughput on loopback, in this process.

The receiver serves from its own threads as on a decode replica; the sender
pushes chunks shaped like the model's KV (``[layers, 2, blocks, BS, Hk, D]``)
one after another, each acknowledged before the next, as a hand-off does.
Headers (with their crc32) are made before the clock starts, as the prefill
worker makes them while packing.
"""

from __future__ import annotations

import asyncio
import time

import torch

from splitserve.handoff.transfer.base import KVSink, TransportConfig, get_transport, make_header


class CountingSink(KVSink):
    """Stores nothing beyond what the receiver already landed; counts bytes."""

    def __init__(self):
        self.nbytes = 0

    def expect(self, handoff_id: str) -> int:
        return 1 << 40

    def write_layers(self, header, buf) -> None:
        self.nbytes += header.nbytes


def measure_transport(transport: str, num_layers: int, num_kv_heads: int, head_dim: int,
                      block_size: int, total_bytes: int = 32 << 20,
                      chunk_bytes: int = 4 << 20) -> tuple[int, float]:
    """(bytes moved, seconds) for ``total_bytes`` of KV in chunks of about
    ``chunk_bytes`` over ``transport`` (grpc) on loopback."""
    sender_cls, receiver_cls = get_transport(transport)
    per_block = num_layers * 2 * block_size * num_kv_heads * head_dim * 2  # bf16
    blocks = max(1, chunk_bytes // per_block)
    count = max(2, total_bytes // (blocks * per_block))
    g = torch.Generator().manual_seed(0)
    bufs = [torch.randint(-1000, 1000, (num_layers, 2, blocks, block_size, num_kv_heads, head_dim),
                          dtype=torch.int16, generator=g).view(torch.bfloat16) for _ in range(count)]
    headers = [make_header(f"probe-{i}", 0, num_layers, b) for i, b in enumerate(bufs)]
    msg = 1 << 20
    cfg = TransportConfig(token="profile-probe", chunk_bytes=msg, max_message_bytes=msg + 4096)
    rx = receiver_cls(cfg)
    endpoint = rx.start(CountingSink())
    tx = sender_cls(cfg)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(tx.send(endpoint, headers[0], bufs[0], 60.0))  # warm up
        t0 = time.perf_counter()
        for h, b in zip(headers[1:], bufs[1:]):
            loop.run_until_complete(tx.send(endpoint, h, b, 60.0))
        dt = time.perf_counter() - t0
        loop.run_until_complete(tx.close())
    finally:
        loop.close()
        rx.stop(0.5)
    return sum(h.nbytes for h in headers[1:]), dt
