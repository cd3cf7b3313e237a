"""The engine's adapters: host cache, device slots, and the copies between.

``LoraManager`` lives on the engine thread. Adapters are kept in host
memory (``max_cpu_loras`` of them, least recently used evicted first, but
never one that a live request names) and copied into one of the model's
``max_loras`` device slots when a sequence that uses it is admitted
(``try_acquire``, called by the scheduler; ``splitserve.engine.lora.slots``
decides which slot). Reading an adapter's files (``read``) touches no
engine state, so callers run it off the engine thread and hand the result
to ``install``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import AdapterError
from splitserve.engine.lora.adapter import AdapterRef
from splitserve.engine.lora.slots import SlotTable
from splitserve.engine.lora.weights import AdapterWeights, load_adapter
from splitserve.engine.parallel.lora_shards import shard_adapter

if TYPE_CHECKING:
    from splitserve.engine.models.lora_layers import LoraStack
    from splitserve.engine.parallel.launcher import TensorParallelRanks
    from splitserve.engine.sequence import Sequence


class LoraManager:
    def __init__(self, model, model_cfg: ModelConfig, num_slots: int, max_rank: int,
                 max_cpu: int, dtype: torch.dtype, live_keys: Callable[[], Iterable[str]],
                 tp: "TensorParallelRanks | None" = None):
        """``model``: a CausalLM, whose LoRA stacks this allocates;
        ``live_keys()``: the adapter keys that live requests name (never
        evicted from host memory); ``tp``: the replica's other ranks, when
        ``model`` is rank 0's shard: each rank holds its part of every
        adapter in a slot (``splitserve.engine.parallel.lora_shards``)."""
        self.model_cfg = model_cfg
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.max_cpu = max(max_cpu, 1)
        self.dtype = dtype
        self.targets: dict[tuple[int, str], tuple[LoraStack, int]] = model.enable_lora(
            num_slots, max_rank)
        self.stacks = list({id(s): s for s, _ in self.targets.values()}.values())
        self.table = SlotTable(num_slots)
        self.host: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._live_keys = live_keys
        self.tp = tp
        self.adapter_rows = getattr(model, "adapter_rows", lambda name, b: b)

    # -- host memory -----------------------------------------------------------------
    def read(self, ref: AdapterRef) -> AdapterWeights:
        """``ref``'s weights from its files (any thread); refused here, at
        registration, where they do not split across the replica's ranks."""
        weights = load_adapter(ref, self.model_cfg, self.max_rank, self.dtype)
        unserved = sorted({proj for layer, proj in weights.modules
                           if (layer, proj) not in self.targets})
        if unserved:  # the layout took a projection this model keeps no stack for
            raise AdapterError(f"adapter {ref.name!r}: this model serves no adapter on "
                               f"{', '.join(unserved)}", param="target_modules")
        weights = AdapterWeights(weights.ref, {  # in the row order the model holds its weights
            key: (a, self.adapter_rows(key[1], b)) for key, (a, b) in weights.modules.items()})
        if self.tp is not None:
            shard_adapter(weights.modules, self.tp.plan)
        return weights

    def has(self, key: str) -> bool:
        return key in self.host

    def install(self, weights: AdapterWeights) -> None:
        """Keep ``weights`` in host memory, evicting the least recently used
        adapters over ``max_cpu`` that no live request names."""
        key = weights.ref.key
        self.host[key] = weights
        self.host.move_to_end(key)
        if len(self.host) <= self.max_cpu:
            return
        live = set(self._live_keys())
        for old in list(self.host):
            if len(self.host) <= self.max_cpu:
                break
            if old != key and old not in live:
                del self.host[old]

    def ensure(self, ref: AdapterRef) -> None:
        """``ref`` in host memory, read from its files here if it is not."""
        if ref.key in self.host:
            self.host.move_to_end(ref.key)
        else:
            self.install(self.read(ref))

    def drop(self, key: str) -> None:
        """Forget an adapter no live request names (it was unloaded):
        its host copy, and its slot unless a running sequence holds it."""
        if key in set(self._live_keys()):
            return
        self.host.pop(key, None)
        slot = self.table.forget(key)
        if slot is not None:
            for stack in self.stacks:
                stack.clear(slot)
            if self.tp is not None:
                self.tp.clear_adapter(slot)

    # -- device slots (the scheduler's gate) --------------------------------------------
    def try_acquire(self, seq: "Sequence") -> bool:
        """Give ``seq`` its adapter's slot (copying the adapter in if needed);
        False when every slot is held by other adapters' running sequences.
        A sequence without an adapter, or already holding its slot, passes."""
        if seq.adapter is None or seq.lora_slot >= 0:
            return True
        key = seq.adapter.key
        if not self.table.can_acquire(key):
            return False
        weights = self.host.get(key)
        if weights is None and self.table.slot_of(key) is None:
            self.ensure(seq.adapter)  # evicted from host memory since it was added
            weights = self.host[key]
        grant = self.table.acquire(key)
        if grant.load:
            self._write(grant.slot, weights)
        seq.lora_slot = grant.slot
        return True

    def release(self, seq: "Sequence") -> None:
        """Give back ``seq``'s slot reference (finished or preempted). Idempotent."""
        if seq.lora_slot >= 0:
            self.table.release(seq.lora_slot)
            seq.lora_slot = -1

    @torch.no_grad()
    def _write(self, slot: int, weights: AdapterWeights) -> None:
        modules = weights.modules
        if self.tp is not None:  # every rank its part; this one, rank 0's
            self.tp.write_adapter(slot, modules)
            modules = shard_adapter(modules, self.tp.plan)
        for stack in self.stacks:
            stack.clear(slot)
        for key, (a, b) in modules.items():
            stack, part = self.targets[key]
            stack.write(slot, part, a, b)

    # -- what the replica reports ---------------------------------------------------------
    def resident_keys(self) -> tuple[str, ...]:
        """Adapters in device slots."""
        return tuple(self.table.resident())

    def host_keys(self) -> tuple[str, ...]:
        return tuple(self.host)

    def name_of(self, key: str) -> str | None:
        w = self.host.get(key)
        return None if w is None else w.ref.name
