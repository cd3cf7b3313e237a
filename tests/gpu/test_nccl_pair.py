"""torch_dist with CUDA tensors between two processes on two GPUs: the pair
is built on NCCL and chunks arrive on the receiver's GPU bit for bit.
Needs two GPUs (NCCL refuses two ranks on one device); skipped otherwise."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import pytest
import torch

from splitserve.handoff.transfer.base import TransportConfig, make_header
from splitserve.handoff.transfer.torch_dist_transport import TorchDistKVReceiver, TorchDistKVSender
from tests.unit.transfer_sinks import RecordingSink

pytestmark = [pytest.mark.skipif(torch.cuda.device_count() < 2,
                                 reason="an NCCL pair needs two GPUs"),
              pytest.mark.timeout(180)]
TOKEN = "nccl-secret"


def _chunk(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return (torch.randn(4, 2, 8 + i, 16, 8, 128, generator=g) * 10).to(torch.bfloat16)


def _sender(endpoint: str, n: int, results) -> None:
    torch.cuda.set_device(0)

    async def main():
        tx = TorchDistKVSender(TransportConfig(token=TOKEN, connect_timeout_s=60))
        for i in range(n):
            buf = _chunk(i).cuda(0)
            await tx.send(endpoint, make_header(f"p{i}", 0, 4, buf), buf, 60.0)
        backends = [p.backend for p in tx._pairs.values()]
        await tx.close()
        results.put(("done", backends))
    asyncio.run(main())


def test_nccl_pair_moves_chunks_between_two_gpus():
    torch.cuda.set_device(1)
    rx = TorchDistKVReceiver(TransportConfig(token=TOKEN, device="cuda:1", connect_timeout_s=60))
    sink = RecordingSink()
    for i in range(3):
        sink.reserve(f"p{i}", 1 << 28)
    endpoint = rx.start(sink)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_sender, args=(endpoint, 3, results))
    proc.start()
    try:
        assert results.get(timeout=150) == ("done", ["nccl"])
        proc.join(30)
        assert proc.exitcode == 0
        for i in range(3):
            (got,) = sink.received(f"p{i}")
            assert got.device == torch.device("cuda", 1)
            assert torch.equal(got.cpu(), _chunk(i))
    finally:
        if proc.is_alive():
            proc.kill()
        rx.stop()
