"""Rank 0's handle on its replica's other ranks: start them, send each step,
stop them.

Why processes the engine spawns (torch.multiprocessing, ``spawn``), not
actors of the cluster: the engine stays free of Ray, the replica is one
unit to whoever places it (in the cluster, one Ray actor that asks for
``tensor_parallel_size`` GPUs, so its ranks land on the same node and see
exactly those GPUs: rank r uses the r-th), and a rank's lifetime is tied to
its engine's process (``rank_worker`` exits when it is gone).
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import weakref
from multiprocessing.connection import Connection, wait

import torch
import torch.multiprocessing as mp

from splitserve.engine.errors import EngineDeadError
from splitserve.engine.parallel.group import TPGroup, open_store
from splitserve.engine.parallel.kv import ShardedKV
from splitserve.engine.parallel.lora_shards import shard_adapter
from splitserve.engine.parallel.messages import (ClearAdapter, RankFailed, RankJoining, RankReady,
                                                 RankSpec, StepCommand, Stop, WriteAdapter)
from splitserve.engine.parallel.plan import ShardPlan
from splitserve.engine.parallel.rank_worker import rank_main

log = logging.getLogger("splitserve.engine.parallel")
READY_TIMEOUT_S = 600.0  # ranks load their shards in parallel with rank 0
STORE_TIMEOUT_S = 120.0


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU after rank 0's (the replica's GPUs), or the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def _stop_processes(procs: list, conns: list[Connection]) -> None:
    for c in conns:
        try:
            c.send(Stop())
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(5.0)
        if p.is_alive():
            p.terminate()
            p.join(2.0)
    for c in conns:
        c.close()


def _wait_for(procs: list, conns: list[Connection], kind: type, timeout_s: float) -> None:
    """Wait for one ``kind`` message from every rank; raise EngineDeadError
    with the rank's error, or when a rank process ends or stays silent."""
    pending = {c: r for r, c in enumerate(conns, start=1)}
    while pending:
        sentinels = [procs[r - 1].sentinel for r in pending.values()]
        if not wait(list(pending) + sentinels, timeout_s):
            raise EngineDeadError(f"tensor-parallel ranks {sorted(pending.values())} sent no "
                                  f"{kind.__name__} within {timeout_s:.0f} s")
        for c, r in list(pending.items()):
            if c.poll():
                try:
                    msg = c.recv()
                except (EOFError, OSError):
                    procs[r - 1].join(5.0)
                    msg = RankFailed(r, _exited(procs[r - 1]))
                if isinstance(msg, RankFailed):
                    raise EngineDeadError(f"tensor-parallel rank {r} failed to start: {msg.error}")
                if isinstance(msg, kind):
                    del pending[c]
            elif not procs[r - 1].is_alive():
                raise EngineDeadError(f"tensor-parallel rank {r} failed to start: "
                                      f"{_exited(procs[r - 1])}")


def _exited(proc) -> str:
    return (f"its process exited (exit code {proc.exitcode}); a script that builds a "
            "tensor-parallel engine must guard its entry point with "
            "`if __name__ == \"__main__\":`, as ranks start by importing it")


class TensorParallelRanks:
    """Started by ``start``; ``group`` is rank 0's TPGroup for its own shard."""

    def __init__(self, plan: ShardPlan, group: TPGroup, procs: list, conns: list[Connection],
                 kv_conns: list[Connection]):
        self.plan = plan
        self.group = group
        self._procs = procs
        self._conns = conns
        self._kv_conns = kv_conns
        self.kv: ShardedKV | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_processes, procs, conns + kv_conns)

    @property
    def size(self) -> int:
        return self.plan.size

    @classmethod
    def start(cls, plan: ShardPlan, model: str, dtype: torch.dtype, kv_dtype: torch.dtype,
              device: torch.device, num_blocks: int, block_size: int,
              num_state_slots: int = 0, weight_dtype: str = "auto", max_loras: int = 0,
              max_lora_rank: int = 0) -> "TensorParallelRanks":
        """Spawn ranks 1..N-1 and join the groups with them (they load their
        shards from here on; ``wait_ready`` waits for that). ``num_state_slots``:
        a hybrid model's recurrent-state slots on each rank; ``weight_dtype``
        "fp8": each rank quantizes its shard's projections, as rank 0 does;
        ``max_loras`` LoRA slots of ``max_lora_rank`` on each rank's shard."""
        ctx = mp.get_context("spawn")
        store = open_store(STORE_TIMEOUT_S)
        prefix, secret = secrets.token_hex(16), secrets.token_bytes(32)
        procs, conns, kv_conns = [], [], []
        for r in range(1, plan.size):
            ours, theirs = ctx.Pipe()
            kv_ours, kv_theirs = ctx.Pipe()
            spec = RankSpec(
                rank=r, size=plan.size, model=str(model), dtype=str(dtype).removeprefix("torch."),
                kv_dtype=str(kv_dtype).removeprefix("torch."), device=str(rank_device(device, r)),
                num_blocks=num_blocks, block_size=block_size, store_port=store.port,
                prefix=prefix, secret=secret, num_threads=torch.get_num_threads(),
                parent_pid=os.getpid(), num_state_slots=num_state_slots,
                weight_dtype=weight_dtype, max_loras=max_loras, max_lora_rank=max_lora_rank)
            p = ctx.Process(target=rank_main, args=(spec, theirs, kv_theirs),
                            name=f"splitserve-tp-rank{r}", daemon=True)
            p.start()
            theirs.close()
            kv_theirs.close()
            procs.append(p)
            conns.append(ours)
            kv_conns.append(kv_ours)
        try:
            _wait_for(procs, conns, RankJoining, READY_TIMEOUT_S)
            group = TPGroup.join(plan, device, store, prefix, secret)
        except BaseException:
            _stop_processes(procs, conns + kv_conns)
            raise
        ranks = cls(plan, group, procs, conns, kv_conns)
        ranks._store = store  # the ranks' groups keep using it
        return ranks

    def wait_ready(self, cache: torch.Tensor) -> None:
        """Wait until every rank loaded its shard; ``cache``: rank 0's KV
        cache, which KV moves read and write. Raises EngineDeadError with a
        rank's error."""
        try:
            _wait_for(self._procs, self._conns, RankReady, READY_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.kv = ShardedKV(self.group, cache, self._kv_conns)

    def send_step(self, cmd: StepCommand) -> None:
        """Hand the step to every other rank (they run it as rank 0 does)."""
        for r in range(1, self.plan.size):
            self._send(r, cmd)

    def write_adapter(self, slot: int, modules: dict) -> None:
        """Give every other rank its part of the adapter ``modules`` (the
        whole model's (A, B) per (layer, projection)) for LoRA slot ``slot``;
        they take it before the next step."""
        for r in range(1, self.plan.size):
            part = shard_adapter(modules, ShardPlan(self.plan.cfg, self.plan.size, r))
            buf = io.BytesIO()
            torch.save(part, buf)
            self._send(r, WriteAdapter(slot, buf.getvalue()))

    def clear_adapter(self, slot: int) -> None:
        for r in range(1, self.plan.size):
            self._send(r, ClearAdapter(slot))

    def _send(self, rank: int, msg) -> None:
        p, c = self._procs[rank - 1], self._conns[rank - 1]
        if not p.is_alive():
            raise self.broken(RuntimeError(f"rank process {p.name} exited ({p.exitcode})"))
        try:
            c.send(msg)
        except (OSError, ValueError) as e:
            raise self.broken(e) from e

    def broken(self, exc: BaseException) -> EngineDeadError:
        """A step failed part way: the ranks may be stuck in a collective, so
        the replica cannot go on. Stops the ranks; returns the error to raise."""
        self.close()
        return EngineDeadError(f"a tensor-parallel step failed ({type(exc).__name__}: {exc}); "
                               "the replica's ranks are stopped")

    def close(self) -> None:
        """Stop every rank. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        self.group.shutdown()


def start_ranks(cfg, checkpoint, dtype: torch.dtype,
                device: torch.device) -> tuple[TensorParallelRanks, int]:
    """For ``LLMEngine``: check that the model splits ``cfg.tensor_parallel_size``
    ways, size the KV cache (each rank holds ``kv_cache_memory_gb`` of its
    heads' KV and recurrent states), start the other ranks. Returns (the ranks, blocks per rank)."""
    from splitserve.engine.model_runner import kv_cache_dtype, num_kv_blocks, num_state_slots

    plan = ShardPlan(checkpoint.model_config, cfg.tensor_parallel_size, 0)
    kv_dtype = kv_cache_dtype(cfg, dtype)
    num_blocks = num_kv_blocks(cfg, plan.local_config(), kv_dtype)
    ranks = TensorParallelRanks.start(plan, str(checkpoint.path), dtype, kv_dtype, device,
                                      num_blocks, cfg.block_size, num_state_slots(cfg),
                                      cfg.weight_dtype, cfg.max_loras, cfg.max_lora_rank)
    return ranks, num_blocks
