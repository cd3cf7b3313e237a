"""KV chunks over gRPC: one client-streaming ``Push`` call per chunk.

The first frame carries the header, the following frames carry the raw
bytes in ``chunk_bytes`` slices (no per-element encoding), sent once the
receiver has admitted the header (``grpc_client``); the cluster token
travels as metadata on every call. The receiver bounds each message
(``max_message_bytes``) and the whole chunk (``sink.expect``), verifies
length and crc32, then hands a ``[L, 2, n, BS, Hk, D]`` view of its buffer to
the sink. Works between any two hosts; TLS when ``TransportConfig.tls`` is set.
"""

from __future__ import annotations

import socket
import uuid
from typing import Iterator

import torch

from splitserve.handoff.transfer import wire
from splitserve.handoff.transfer.base import (ChunkHeader, KVReceiver, KVSender, KVSink, PeerInfo,
                                  TransportConfig)
from splitserve.handoff.transfer.chunks import check_buffer, check_header, host_bytes
from splitserve.handoff.transfer.grpc_client import ChannelPool
from splitserve.handoff.transfer.grpc_server import TransferServer, TransferService


def advertised_host(host: str) -> str:
    """The address peers should dial for a server bound to ``host``."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return socket.gethostbyname(socket.gethostname())
    return host


class GrpcKVSender(KVSender):
    def __init__(self, config: TransportConfig):
        super().__init__(config)
        self.sender_id = uuid.uuid4().hex
        self._pool = ChannelPool(config)

    async def send(self, endpoint: str, header: ChunkHeader, buf: torch.Tensor,
                   timeout_s: float) -> None:
        check_header(header)
        check_buffer(header, buf)
        data = host_bytes(buf)  # [nbytes] uint8; a view for contiguous CPU buffers
        await self._pool.push(endpoint, self.sender_id, wire.encode_header_frame(header),
                              self._frames(data), timeout_s)

    def _frames(self, data: torch.Tensor) -> Iterator[bytes]:
        view = memoryview(data.numpy())
        step = self.config.chunk_bytes
        for off in range(0, len(view), step):
            yield wire.encode_data_frame(view[off:off + step])

    async def ping(self, endpoint: str, timeout_s: float) -> PeerInfo:
        return await self._pool.ping(endpoint, "grpc", self.sender_id, timeout_s)

    async def close(self) -> None:
        await self._pool.close()


class GrpcKVReceiver(KVReceiver):
    def __init__(self, config: TransportConfig):
        super().__init__(config)
        self.receiver_id = uuid.uuid4().hex
        self._server: TransferServer | None = None

    def start(self, sink: KVSink) -> str:
        if self._server is not None:
            raise RuntimeError("receiver already started; make a new one per sink")
        service = TransferService(self.config, sink, self.receiver_id, ("grpc",))
        self._server = TransferServer(self.config, service)
        return f"grpc://{advertised_host(self.config.host)}:{self._server.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s)
