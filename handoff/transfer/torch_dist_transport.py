"""KV chunks over torch.distributed point-to-point (NCCL between GPUs, gloo
between CPUs: the same code), with a gRPC control channel.

Per sender/receiver pair, once: OpenPair (gRPC, token-checked) -> the
receiver names a private TCPStore prefix and a random pair secret -> both
sides build a two-rank group (``torch_dist_pairs``) and prove the secret to
each other over it before any KV moves. Per chunk: Announce (header; the receiver
admits it and posts its recv) -> ``pg.send`` -> Finish (the receiver waits
for its recv, checks length and crc32, calls the sink; the reply is the
ack). A timeout or a lost peer tears the pair down on both sides; the next
send builds a new one. The receiver also drops pairs idle for
``pair_idle_s`` (a sender that died between chunks).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import torch

from splitserve.handoff.transfer import kv_transfer_pb2 as pb
from splitserve.handoff.transfer import torch_dist_pairs as pairs
from splitserve.handoff.transfer import wire
from splitserve.handoff.transfer.base import (ChunkHeader, KVReceiver, KVSender, KVSink, PeerInfo,
                                  TransportConfig)
from splitserve.handoff.transfer.chunks import (NO_CHECKSUM, admit, as_bytes, check_buffer, check_header,
                                    crc32, host_bytes, receive_buffer, verify_checksum,
                                    view_chunk)
from splitserve.handoff.transfer.errors import InvalidChunkError, PeerUnavailable, TransferTimeout
from splitserve.handoff.transfer.grpc_client import ChannelPool
from splitserve.handoff.transfer.grpc_server import TransferServer, TransferService
from splitserve.handoff.transfer.grpc_transport import advertised_host

SCHEME = "torch_dist"


class TorchDistKVReceiver(KVReceiver):
    def __init__(self, config: TransportConfig):
        super().__init__(config)
        self.receiver_id = uuid.uuid4().hex
        self.device = torch.device(config.device)
        self._pairs: dict[str, pairs.RxPair] = {}
        self._lock = threading.Lock()
        self._server: TransferServer | None = None
        self._store: Any = None
        self._stopping = threading.Event()
        self._reaper: threading.Thread | None = None
        self._service: TransferService | None = None

    def start(self, sink: KVSink) -> str:
        if self._server is not None:
            raise RuntimeError("receiver already started; make a new one per sink")
        self._store = pairs.new_store(self.config.host, self.config.connect_timeout_s)
        self._service = TransferService(self.config, sink, self.receiver_id, (SCHEME, "grpc"),
                                        pairs=self)
        self._server = TransferServer(self.config, self._service)
        self._reaper = threading.Thread(target=self._reap_loop, name="kv-pair-reaper", daemon=True)
        self._reaper.start()
        return f"{SCHEME}://{advertised_host(self.config.host)}:{self._server.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s)
        if self._reaper is not None:
            self._reaper.join()
        for pair_id in list(self._pairs):
            self._drop(pair_id, abort=True)
        self._store = None

    @property
    def num_pairs(self) -> int:
        with self._lock:
            return len(self._pairs)

    # -- pair calls (grpc_server.PairHandler) -----------------------------------

    def open_pair(self, req: pb.OpenPairRequest) -> pb.OpenPairReply:
        want_nccl = req.backend == "nccl" and self.device.type == "cuda" and pairs.nccl_available()
        pair_id = uuid.uuid4().hex
        pair = pairs.RxPair(pair_id, "nccl" if want_nccl else "gloo", f"kvpair/{pair_id}/",
                            pairs.new_pair_secret())
        with self._lock:
            self._pairs[pair.pair_id] = pair
        threading.Thread(target=self._build, args=(pair,), name="kv-pair-build",
                         daemon=True).start()
        return pb.OpenPairReply(pair_id=pair.pair_id, store_port=self._store.port,
                                store_prefix=pair.prefix, backend=pair.backend,
                                pair_secret=pair.secret)

    def _build(self, pair: pairs.RxPair) -> None:
        timeout = self.config.connect_timeout_s
        try:
            pg = pairs.new_group(self._store, pair.prefix, pairs.RECEIVER_RANK, pair.backend,
                                 self.config.host, timeout)
            device = self.device if pair.backend == "nccl" else torch.device("cpu")
            try:
                pairs.handshake(pg, pairs.RECEIVER_RANK, device, pair.secret, timeout)
            except Exception:
                pairs.close_group(pg, abort=True)
                raise
            pair.pg = pg
        except Exception as exc:
            pair.error = exc
        pair.ready.set()
        if pair.error is not None or pair.closed:
            self._drop(pair.pair_id, abort=True)

    def announce(self, req: pb.AnnounceRequest) -> pb.AnnounceReply:
        pair = self._get(req.pair_id)
        pg = pair.wait_ready(self.config.connect_timeout_s)
        header = wire.header_from_proto(req.header)
        admit(header, self._service.sink, self.config.require_checksum)
        if pair.backend == "nccl":
            base = receive_buffer(header, self.device)
        else:
            base = self._service.buffers.acquire(header.nbytes)
        data = base[:header.nbytes]  # [nbytes] uint8
        work = pg.recv([data], pairs.SENDER_RANK, pairs.tag_of(req.seq))
        pair.pending[req.seq] = pairs.Pending(header, base, data, work)
        return pb.AnnounceReply()

    def finish(self, req: pb.FinishRequest) -> pb.FinishReply:
        pair = self._get(req.pair_id)
        pend = pair.pending.get(req.seq)
        if pend is None:
            raise InvalidChunkError(f"pair {req.pair_id}: no chunk {req.seq} was announced")
        try:
            try:
                pairs.wait_work(pend.work, req.timeout_s, f"recv of chunk {req.seq}")
            except (TransferTimeout, PeerUnavailable):
                self._drop(req.pair_id, abort=True)
                raise
            try:
                self._verify(pend.header, pend.data)
                self._service.sink.write_layers(pend.header, view_chunk(pend.header, pend.data))
            finally:
                # the recv is complete, so nothing writes into the buffer any more
                if pend.base.device.type == "cpu":
                    self._service.buffers.release(pend.base)
        finally:
            pair.pending.pop(req.seq, None)
            pair.touch()
        return pb.FinishReply(nbytes=pend.header.nbytes)

    def _verify(self, header: ChunkHeader, data: torch.Tensor) -> None:
        if header.checksum != NO_CHECKSUM:
            verify_checksum(header, crc32(data if data.device.type == "cpu" else data.cpu()))

    def close_pair(self, req: pb.ClosePairRequest) -> pb.ClosePairReply:
        self._drop(req.pair_id, abort=False)
        return pb.ClosePairReply()

    # -- bookkeeping ----------------------------------------------------------------

    def _get(self, pair_id: str) -> pairs.RxPair:
        with self._lock:
            pair = self._pairs.get(pair_id)
        if pair is None:
            raise PeerUnavailable(f"pair {pair_id} is closed on the receiver; open a new one")
        pair.touch()
        return pair

    def _drop(self, pair_id: str, abort: bool) -> None:
        with self._lock:
            pair = self._pairs.pop(pair_id, None)
        if pair is None:
            return
        pair.closed = True
        if pair.pg is not None:
            pairs.close_group(pair.pg, abort=abort or bool(pair.pending))
            pair.pg = None
        # buffers of recvs cut short are left to the garbage collector, not the
        # pool: a finish() still unwinding may hold them

    def _reap_loop(self) -> None:
        period = min(max(self.config.pair_idle_s / 4, 0.05), 5.0)
        while not self._stopping.wait(period):
            self.reap_idle()

    def reap_idle(self) -> list[str]:
        """Drop pairs with nothing in flight unused for ``pair_idle_s``."""
        now = time.monotonic()
        with self._lock:
            idle = [p.pair_id for p in self._pairs.values() if p.ready.is_set() and not p.pending
                    and now - p.last_used > self.config.pair_idle_s]
        for pair_id in idle:
            self._drop(pair_id, abort=True)
        return idle


class _TxPair:
    def __init__(self, pair_id: str, requested: str, backend: str, pg: Any, store: Any):
        self.pair_id = pair_id
        self.requested = requested  # what the sender asked for; NCCL may be refused
        self.backend = backend
        self.pg = pg
        self.store = store  # keeps the store connection alive as long as the group
        self.seq = 0
        self.lock = asyncio.Lock()


class TorchDistKVSender(KVSender):
    def __init__(self, config: TransportConfig):
        super().__init__(config)
        self.sender_id = uuid.uuid4().hex
        self._pool = ChannelPool(config)
        self._pairs: dict[str, _TxPair] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._closing: set[asyncio.Task] = set()

    async def send(self, endpoint: str, header: ChunkHeader, buf: torch.Tensor,
                   timeout_s: float) -> None:
        check_header(header)
        check_buffer(header, buf)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        left = lambda: deadline - loop.time()  # noqa: E731
        pair = await self._pair(endpoint, buf.device, left)
        async with pair.lock:
            if self._pairs.get(endpoint) is not pair:
                raise PeerUnavailable(f"{endpoint}: pair closed while waiting to send")
            pair.seq += 1
            seq = pair.seq
            # gloo pairs carry device buffers too, staged through the host
            data = as_bytes(buf) if pair.backend == "nccl" else host_bytes(buf)  # [nbytes] uint8
            try:
                await self._pool.unary(endpoint, SCHEME, "Announce", pb.AnnounceRequest(
                    pair_id=pair.pair_id, seq=seq, header=wire.header_to_proto(header)), left())
                try:
                    work = pair.pg.send([data], pairs.RECEIVER_RANK, pairs.tag_of(seq))
                except RuntimeError as exc:
                    raise PeerUnavailable(f"{endpoint}: send on pair failed: {exc}") from None
                await asyncio.to_thread(pairs.wait_work, work, left(), f"{endpoint}: send")
                await self._pool.unary(endpoint, SCHEME, "Finish", pb.FinishRequest(
                    pair_id=pair.pair_id, seq=seq, timeout_s=left()), left())
            except (TransferTimeout, PeerUnavailable):
                # the pair may hold a half-done op: neither side can reuse it
                self._drop(endpoint, pair)
                raise

    async def _pair(self, endpoint: str, device: torch.device, left) -> _TxPair:
        backend = "nccl" if device.type == "cuda" else "gloo"
        pair = self._pairs.get(endpoint)
        if pair is not None and pair.requested == backend:
            return pair
        lock = self._opening.setdefault(endpoint, asyncio.Lock())
        async with lock:
            pair = self._pairs.get(endpoint)
            if pair is not None and pair.requested == backend:
                return pair
            if pair is not None:
                self._drop(endpoint, pair)
            rep = await self._pool.unary(endpoint, SCHEME, "OpenPair", pb.OpenPairRequest(
                backend=backend, timeout_s=self.config.connect_timeout_s), left())
            host = wire.grpc_target(endpoint, SCHEME).rsplit(":", 1)[0]
            timeout = min(left(), self.config.connect_timeout_s)
            try:
                store, pg = await asyncio.to_thread(self._build, host, rep, device, timeout)
            except (RuntimeError, TransferTimeout) as exc:
                raise PeerUnavailable(
                    f"{endpoint}: could not join pair {rep.pair_id}: {exc}") from None
            pair = _TxPair(rep.pair_id, backend, rep.backend, pg, store)
            self._pairs[endpoint] = pair
            return pair

    def _build(self, host: str, rep: pb.OpenPairReply, device: torch.device,
               timeout_s: float) -> tuple[Any, Any]:
        store = pairs.connect_store(host, rep.store_port, timeout_s)
        pg = pairs.new_group(store, rep.store_prefix, pairs.SENDER_RANK, rep.backend,
                             pairs.local_address_towards(host), timeout_s)
        try:
            pairs.handshake(pg, pairs.SENDER_RANK,
                            device if rep.backend == "nccl" else torch.device("cpu"),
                            rep.pair_secret, timeout_s)
        except Exception:
            pairs.close_group(pg, abort=True)
            raise
        return store, pg

    def _drop(self, endpoint: str, pair: _TxPair) -> None:
        """Forget and abort ``pair`` now; tell the receiver in the background
        so a failing send is not held up by a dead peer."""
        if self._pairs.get(endpoint) is pair:
            del self._pairs[endpoint]
        pairs.close_group(pair.pg, abort=True)
        task = asyncio.get_running_loop().create_task(self._close_remote(endpoint, pair.pair_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_remote(self, endpoint: str, pair_id: str) -> None:
        try:
            await self._pool.unary(endpoint, SCHEME, "ClosePair",
                                   pb.ClosePairRequest(pair_id=pair_id), 1.0)
        except Exception:  # the receiver reaps idle pairs anyway
            pass

    async def ping(self, endpoint: str, timeout_s: float) -> PeerInfo:
        return await self._pool.ping(endpoint, SCHEME, self.sender_id, timeout_s)

    @property
    def num_pairs(self) -> int:
        return len(self._pairs)

    async def close(self) -> None:
        for endpoint, pair in list(self._pairs.items()):
            async with pair.lock:
                self._pairs.pop(endpoint, None)
                await self._close_remote(endpoint, pair.pair_id)
                pairs.close_group(pair.pg, abort=False)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self._pool.close()
