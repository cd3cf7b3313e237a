"""Ranks 1..N-1 of a tensor-parallel replica: a process each, started by
rank 0's engine (``splitserve.engine.parallel.launcher``).

A rank joins the replica's process groups, loads its shard of the
checkpoint, allocates its heads' part of the paged KV cache (as many blocks
as rank 0, the same block tables) and, for a hybrid model, of the
recurrent states (as many slots as rank 0), reports ready, then runs every
``StepCommand`` rank 0 sends: the same forward on its shards, the same
LM-head calls (its vocabulary rows go to rank 0, which alone samples). A
thread serves rank 0's KV moves (``splitserve.engine.parallel.kv.serve``).

It exits when rank 0 says ``Stop``, when its pipe closes, when its parent
process is gone (checked every second: a rank never outlives its engine),
or on any error (rank 0's next collective with it then fails, and the
engine stops).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from multiprocessing.connection import Connection

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import DTYPES
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.parallel import kv
from splitserve.engine.parallel.group import TPGroup, connect_store
from splitserve.engine.parallel.messages import (ClearAdapter, RankFailed, RankJoining, RankReady,
                                                 RankSpec, StepCommand, Stop, WriteAdapter)
from splitserve.engine.parallel.plan import ShardPlan
from splitserve.engine.state_cache import RecurrentState
from splitserve.kernels.lora import lora_meta_runs

log = logging.getLogger("splitserve.engine.parallel")
STORE_TIMEOUT_S = 120.0
KV_DTYPES = {**DTYPES, "float8_e4m3fn": torch.float8_e4m3fn}


def _watch_parent(pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)
            if os.getppid() != pid:
                os._exit(3)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def prepare_states(state: RecurrentState, cmd: StepCommand) -> None:
    """Rank 0's state copies and rollbacks since the last step, then this
    step's zeroing and restores (``ModelRunner._run``), on this rank's heads."""
    state.replay(cmd.state_ops)
    state.clear_kept()
    state.zero(cmd.fresh_slots)
    for src, dst in cmd.restores:
        state.copy_slot(src, dst)


class RankAdapters:
    """This rank's LoRA stacks: its parts of the adapters rank 0 puts in slots."""

    def __init__(self, model, num_slots: int, max_rank: int):
        self.num_slots = num_slots
        self.targets = model.enable_lora(num_slots, max_rank)
        self.stacks = list({id(s): s for s, _ in self.targets.values()}.values())

    @torch.no_grad()
    def write(self, msg: WriteAdapter) -> None:
        self.clear(msg.slot)
        modules = torch.load(io.BytesIO(msg.modules), weights_only=True)
        for key, (a, b) in modules.items():
            stack, part = self.targets[key]
            stack.write(msg.slot, part, a, b)

    def clear(self, slot: int) -> None:
        for stack in self.stacks:
            stack.clear(slot)


def run_step(model, cache: torch.Tensor, cmd: StepCommand, device: torch.device,
             prompt_slice: int, state: RecurrentState | None = None,
             adapters: RankAdapters | None = None) -> None:
    """The forward and LM-head calls of one step, as rank 0 runs them."""
    def t(x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype, device=device)

    meta = AttentionMetadata(
        slot_mapping=t(cmd.slot_mapping), block_tables=t(cmd.block_tables, torch.int32),
        cu_query_lens=t(cmd.cu_query_lens, torch.int32),
        context_lens=t(cmd.context_lens, torch.int32), decode_only=cmd.decode_only,
        k_scale=cmd.k_scale, v_scale=cmd.v_scale)
    if state is not None:
        prepare_states(state, cmd)
        meta.state_slots = t(cmd.state_slots)
        meta.query_lens, meta.keep_states = cmd.query_lens, cmd.keep_states
    kwargs = {}
    if cmd.lora_runs is not None and adapters is not None:
        kwargs["lora"] = lora_meta_runs(cmd.lora_runs, adapters.num_slots, device)
    hidden = model(t(cmd.input_ids), t(cmd.positions), cache, meta, **kwargs)
    rows = t(cmd.prompt_rows)
    for a in range(0, len(cmd.prompt_rows), prompt_slice):
        model.compute_logits(hidden.index_select(0, rows[a:a + prompt_slice]))
    if cmd.logit_rows:
        model.compute_logits(hidden.index_select(0, t(cmd.logit_rows)))


@torch.inference_mode()
def rank_main(spec: RankSpec, conn: Connection, kv_conn: Connection) -> None:
    """The process body of rank ``spec.rank``."""
    from splitserve.engine.model_runner import PROMPT_LOGPROB_ROWS

    _watch_parent(spec.parent_pid)
    torch.set_num_threads(spec.num_threads)
    group = None
    try:
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        checkpoint = load_checkpoint(spec.model)
        plan = ShardPlan(checkpoint.model_config, spec.size, spec.rank)
        conn.send(RankJoining(spec.rank))
        store = connect_store(spec.store_port, STORE_TIMEOUT_S)
        group = TPGroup.join(plan, device, store, spec.prefix, spec.secret)
        model = load_model(checkpoint, DTYPES[spec.dtype], device, weight_dtype=spec.weight_dtype,
                           tp=group)
        adapters = RankAdapters(model, spec.max_loras, spec.max_lora_rank) if spec.max_loras else None
        mc, local = plan.cfg, model.cfg
        cache = torch.zeros(mc.num_cache_layers, mc.kv_planes, spec.num_blocks, spec.block_size,
                            local.num_kv_heads, mc.head_dim, dtype=KV_DTYPES[spec.kv_dtype],
                            device=device)
        state = None
        if local.options.hybrid is not None:
            state = RecurrentState(local.options.hybrid, spec.num_state_slots, DTYPES[spec.dtype], device)
            model.bind_state(state)
        threading.Thread(target=kv.serve, args=(group, cache, kv_conn, state), name="tp-kv",
                         daemon=True).start()
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which raises it
        conn.send(RankFailed(spec.rank, f"{type(e).__name__}: {e}"))
        return
    conn.send(RankReady(spec.rank))
    try:
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):
                return
            if isinstance(cmd, Stop):
                return
            if isinstance(cmd, WriteAdapter):
                adapters.write(cmd)
            elif isinstance(cmd, ClearAdapter):
                adapters.clear(cmd.slot)
            else:
                run_step(model, cache, cmd, device, PROMPT_LOGPROB_ROWS, state, adapters)
    except BaseException:
        log.exception("tensor-parallel rank %d failed; it exits", spec.rank)
        os._exit(1)
    finally:
        if group is not None:
            group.shutdown()
        # leave without the interpreter's exit: torn down there, the collectives' threads
        # aborted the process (SIGABRT, "terminate called without an active exception")
        # in most stops; everything this rank holds goes with its process
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
