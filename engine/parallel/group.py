"""The process groups of one replica's tensor-parallel ranks, and the
collectives the sharded model calls.

Groups are built without a global default group (several engines may live
in one process, as in tests and colocated roles): rank 0 owns a TCPStore
listening on loopback only (the ranks of a replica share a node), the ranks
meet under a random prefix, and before any work each rank proves it knows
the replica's secret (an all-gather of per-rank digests that every rank
checks), so a stranger that found the store cannot take a rank's place.

Two groups: ``pg`` carries the forward's collectives (embedding and block
all-reduces, the logits gather) in step order; ``kv_pg`` carries KV moves
for the hand-off (``splitserve.engine.parallel.kv``), which run from other
threads while a step computes.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from splitserve.engine.parallel.plan import ShardPlan

COLLECTIVE_TIMEOUT_S = 300.0  # one collective inside a step (the first includes lazy setup)


class RankFailedError(RuntimeError):
    """A tensor-parallel rank failed or a collective with it did not finish."""


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def open_store(timeout_s: float) -> dist.TCPStore:
    """Rank 0's store on a free loopback port (bound here, handed over)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    fd = sock.detach()
    try:
        return dist.TCPStore("127.0.0.1", port, None, True, _td(timeout_s),
                             wait_for_workers=False, master_listen_fd=fd)
    except Exception:
        os.close(fd)
        raise


def connect_store(port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, None, False, _td(timeout_s))


def _process_group(store: dist.Store, prefix: str, rank: int, size: int, backend: str) -> Any:
    pstore = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = _td(COLLECTIVE_TIMEOUT_S)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        return dist.ProcessGroupGloo(pstore, rank, size, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = _td(COLLECTIVE_TIMEOUT_S)
    return dist.ProcessGroupNCCL(pstore, rank, size, opts)


def _digest(secret: bytes, rank: int) -> bytes:
    return hashlib.sha256(secret + rank.to_bytes(4, "little")).digest()


class TPGroup:
    """This rank's view of its replica's ranks (``plan``: what it holds)."""

    def __init__(self, plan: ShardPlan, device: torch.device, pg: Any, kv_pg: Any):
        self.plan = plan
        self.rank, self.size = plan.rank, plan.size
        self.device = device
        self.pg = pg
        self.kv_pg = kv_pg
        self.comm_s = 0.0  # seconds this rank spent in the forward's collectives

    @classmethod
    def join(cls, plan: ShardPlan, device: torch.device, store: dist.Store, prefix: str,
             secret: bytes) -> "TPGroup":
        """Build both groups (blocks until every rank joins) and check that
        every rank holds ``secret``. Raises RankFailedError otherwise."""
        backend = backend_for(device)
        pg = _process_group(store, f"{prefix}/fwd/", plan.rank, plan.size, backend)
        kv_pg = _process_group(store, f"{prefix}/kv/", plan.rank, plan.size, backend)
        group = cls(plan, device, pg, kv_pg)
        mine = torch.frombuffer(bytearray(_digest(secret, plan.rank)), dtype=torch.uint8).to(device)
        got = [torch.empty_like(mine) for _ in range(plan.size)]
        group.wait(pg.allgather([got], [mine]), "the rank handshake")
        for r, d in enumerate(got):
            if not hmac.compare_digest(d.cpu().numpy().tobytes(), _digest(secret, r)):
                raise RankFailedError(f"tensor-parallel rank {r} did not prove the replica's "
                                      "secret; it is not a rank this engine started")
        return group

    def wait(self, work: Any, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise RankFailedError(f"tensor-parallel {what} failed on rank {self.rank}: {e}") from e

    # -- the forward's collectives (every rank calls them in the same order) --
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial ``x``, in place."""
        t0 = time.perf_counter()
        self.wait(self.pg.allreduce([x]), "all-reduce")
        self.comm_s += time.perf_counter() - t0
        return x

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel embedding: each rank looks up the ids in its
        rows (zeros for the others'), then one all-reduce. ids [T] -> [T, hidden]."""
        start, end = self.plan.vocab()
        mine = (ids >= start) & (ids < end)
        x = F.embedding(torch.where(mine, ids - start, 0), weight)
        x.masked_fill_(~mine[:, None], 0)
        return self.all_reduce(x)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor | None:
        """[N, V/size] per rank -> [N, V] on rank 0 (None on the others)."""
        t0 = time.perf_counter()
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.wait(self.pg.gather([parts] if self.rank == 0 else [], [local], opts), "logits gather")
        self.comm_s += time.perf_counter() - t0
        if self.rank != 0:
            return None
        return torch.cat(parts, dim=-1)[:, :self.plan.cfg.vocab_size]

    def shutdown(self) -> None:
        for pg in (self.pg, self.kv_pg):
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - already broken or gone
                pass
