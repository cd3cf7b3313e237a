"""KV chunks within one process (colocated prefill and decode, tests): the
sender looks the receiver up by endpoint (``inproc://<id>``) and calls its
sink directly, after the same token, header, size and checksum checks the
network transports make. The buffer is handed over as is (no copy, any
device); the sink copies it into its cache before ``send`` returns.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch

from splitserve.engine.auth import secret_matches
from splitserve.handoff.transfer.base import (ChunkHeader, KVReceiver, KVSender, KVSink, PeerInfo,
                                  TransportConfig)
from splitserve.handoff.transfer.chunks import (NO_CHECKSUM, admit, as_bytes, check_buffer, crc32,
                                    verify_checksum)
from splitserve.handoff.transfer.errors import PeerUnavailable, TransferAuthError, TransferTimeout

SCHEME = "inproc"
_receivers: dict[str, "InprocKVReceiver"] = {}
_lock = threading.Lock()


def _lookup(endpoint: str) -> "InprocKVReceiver":
    with _lock:
        rx = _receivers.get(endpoint)
    if rx is None:
        raise PeerUnavailable(f"{endpoint}: no in-process receiver is serving there (stopped, "
                              f"or started in another process)")
    return rx


class InprocKVReceiver(KVReceiver):
    def __init__(self, config: TransportConfig):
        super().__init__(config)
        self.receiver_id = uuid.uuid4().hex
        self.endpoint: str | None = None
        self._sink: KVSink | None = None

    def start(self, sink: KVSink) -> str:
        if self.endpoint is not None:
            raise RuntimeError("receiver already started; make a new one per sink")
        self._sink = sink
        self.endpoint = f"{SCHEME}://{self.receiver_id}"
        with _lock:
            _receivers[self.endpoint] = self
        return self.endpoint

    def stop(self, grace_s: float = 1.0) -> None:
        with _lock:
            _receivers.pop(self.endpoint, None)

    def _authenticate(self, token: str) -> None:
        if not secret_matches(token, self.config.token):
            raise TransferAuthError(f"{self.endpoint}: missing or wrong cluster token; sender "
                                    f"and receiver must share TransportConfig.token")

    def deliver(self, token: str, header: ChunkHeader, buf: torch.Tensor) -> None:
        """The receiving half of a send, run in a worker thread of the sender's loop."""
        self._authenticate(token)
        admit(header, self._sink, self.config.require_checksum)
        check_buffer(header, buf)
        if header.checksum != NO_CHECKSUM:
            verify_checksum(header, crc32(as_bytes(buf).cpu()))
        self._sink.write_layers(header, buf)

    def info(self, token: str) -> PeerInfo:
        self._authenticate(token)
        return PeerInfo(self.receiver_id, (SCHEME,), self.config.layout)


class InprocKVSender(KVSender):
    def __init__(self, config: TransportConfig):
        super().__init__(config)
        # own threads, so a sink stuck past its timeout holds none of the loop's
        self._executor = ThreadPoolExecutor(max_workers=config.max_workers,
                                            thread_name_prefix="kv-inproc-tx")

    async def send(self, endpoint: str, header: ChunkHeader, buf: torch.Tensor,
                   timeout_s: float) -> None:
        rx = _lookup(endpoint)
        # a thread keeps a slow sink from stalling the sender's event loop
        task = asyncio.get_running_loop().run_in_executor(
            self._executor, rx.deliver, self.config.token, header, buf)
        try:
            await asyncio.wait_for(task, timeout_s)
        except asyncio.TimeoutError:
            raise TransferTimeout(f"{endpoint}: the sink did not store the chunk within "
                                  f"{timeout_s:.3f} s") from None

    async def ping(self, endpoint: str, timeout_s: float) -> PeerInfo:
        return _lookup(endpoint).info(self.config.token)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
