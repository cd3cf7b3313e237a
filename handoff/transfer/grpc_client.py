"""Sender-side gRPC channels, one per receiver endpoint, cached per event
loop (a grpc.aio channel belongs to the loop that made it). Shared by the
grpc transport (Push) and torch_dist's control channel (pair calls).

A Push goes out in steps, so that a refusal reaches the sender as the
receiver's status: a new channel's first Push is preceded by a Ping (the
token checked by a unary call, and whether the receiver acknowledges
headers: ``PingReply.push_ack``); then the header frame; then, from such a
receiver, its initial metadata (the header admitted) before any data frame.
Streaming data into a call the receiver has ended loses its status: grpc.aio
reports the failed write as INTERNAL instead. Receivers without the
acknowledgement (older versions) get the frames at once, as before."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Iterable

import grpc

from splitserve.handoff.transfer import kv_transfer_pb2 as pb
from splitserve.handoff.transfer import wire
from splitserve.handoff.transfer.base import PeerInfo, TransportConfig
from splitserve.handoff.transfer.errors import TransferTimeout

_UNARY = {
    "Ping": pb.PingReply,
    "OpenPair": pb.OpenPairReply,
    "Announce": pb.AnnounceReply,
    "Finish": pb.FinishReply,
    "ClosePair": pb.ClosePairReply,
}


@dataclass
class _Conn:
    loop: asyncio.AbstractEventLoop
    channel: grpc.aio.Channel
    push: Any  # stream-unary multicallable taking pre-encoded PushFrame bytes
    unary: dict[str, Any]
    acks: bool | None = None  # the receiver's PingReply.push_ack; None until pinged


class ChannelPool:
    def __init__(self, config: TransportConfig):
        self.config = config
        self._metadata = wire.token_metadata(config)
        self._conns: dict[str, _Conn] = {}

    def _conn(self, endpoint: str, scheme: str) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = self._conns.get(endpoint)
        if conn is not None and conn.loop is loop:
            return conn
        target = wire.grpc_target(endpoint, scheme)
        creds = wire.channel_credentials(self.config)
        opts = wire.channel_options(self.config)
        channel = (grpc.aio.insecure_channel(target, options=opts) if creds is None
                   else grpc.aio.secure_channel(target, creds, options=opts))
        method = f"/{wire.SERVICE}/"
        push = channel.stream_unary(method + "Push", request_serializer=None,
                                    response_deserializer=pb.PushReply.FromString)
        unary = {name: channel.unary_unary(method + name, request_serializer=_serialize,
                                           response_deserializer=rep.FromString)
                 for name, rep in _UNARY.items()}
        conn = _Conn(loop, channel, push, unary)
        self._conns[endpoint] = conn
        return conn

    async def push(self, endpoint: str, sender_id: str, header: bytes, frames: Iterable[bytes],
                   timeout_s: float) -> pb.PushReply:
        """One Push: the encoded ``header`` frame, then the data ``frames``
        once the receiver admitted the header (see the module docstring)."""
        deadline = time.monotonic() + timeout_s
        conn = self._conn(endpoint, "grpc")
        if conn.acks is None:
            info = await self.ping(endpoint, "grpc", sender_id, timeout_s)
            conn.acks = info.push_ack
        call = conn.push(timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata,
                         compression=grpc.Compression.NoCompression)
        try:
            await call.write(header)
            if not conn.acks or wire.PUSH_GO in tuple(await call.initial_metadata()):
                for frame in frames:
                    await call.write(frame)
                await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended: its status says why
        except BaseException:
            call.cancel()
            raise
        return await self._await(call, endpoint)

    async def unary(self, endpoint: str, scheme: str, name: str, request: Any,
                    timeout_s: float) -> Any:
        if timeout_s <= 0:
            raise TransferTimeout(f"{endpoint}: no time left for {name}")
        call = self._conn(endpoint, scheme).unary[name](request, timeout=timeout_s,
                                                        metadata=self._metadata)
        return await self._await(call, endpoint)

    async def _await(self, call: Any, endpoint: str) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise wire.rpc_error(exc, endpoint) from None

    async def ping(self, endpoint: str, scheme: str, sender_id: str, timeout_s: float) -> PeerInfo:
        rep = await self.unary(endpoint, scheme, "Ping", pb.PingRequest(sender_id=sender_id),
                               timeout_s)
        layout = wire.layout_from_proto(rep.layout) if rep.HasField("layout") else None
        return PeerInfo(rep.receiver_id, tuple(rep.transports), layout, rep.push_ack)

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        loop = asyncio.get_running_loop()
        for conn in conns:
            # a channel made on another (finished) loop cannot be awaited here; dropping
            # it releases it with that loop
            if conn.loop is loop:
                await conn.channel.close()


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()
