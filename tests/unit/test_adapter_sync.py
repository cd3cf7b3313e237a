"""An ingress's adapter table against the shared store: a refresh that read
the store before a load or unload through this ingress must not undo it.

The store here is an in-memory table behind ``AdapterStore``'s three calls
(the GCS-backed one runs in tests/integration/test_lora_cluster.py); its
``all`` can be held after taking its snapshot, which is where the race sits.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from splitserve.cluster.api.adapter_registry import AdapterRegistry, BaseFacts
from splitserve.cluster.serve.adapter_store import AdapterStore, AdapterSync, StoredAdapter
from splitserve.engine.loader import load_checkpoint
from tests.fixtures.lora_adapters import build_adapter


class HeldStore(AdapterStore):
    def __init__(self):
        self.table: dict[str, StoredAdapter] = {}
        self.hold = threading.Event()
        self.hold.set()
        self.read = threading.Event()

    def put(self, a, replace):
        if a.name in self.table and not replace:
            return False
        self.table[a.name] = a
        return True

    def delete(self, name):
        return self.table.pop(name, None) is not None

    def all(self):
        snapshot = dict(self.table)
        self.read.set()
        self.hold.wait(10)
        return snapshot


@pytest.fixture(scope="module")
def late(tiny_llama: Path, tmp_path_factory) -> Path:
    return build_adapter(tiny_llama, tmp_path_factory.mktemp("sync") / "late", seed=3)


def make_sync(tiny_llama: Path) -> tuple[AdapterSync, HeldStore]:
    cfg = load_checkpoint(tiny_llama).model_config
    reg = AdapterRegistry({"llama": BaseFacts(cfg, max_loras=2, max_lora_rank=8)})
    store = HeldStore()
    return AdapterSync(reg, set(), store, period_s=3600), store


async def stale_refresh(sync: AdapterSync, store: HeldStore, change) -> bool:
    """A refresh whose snapshot is taken, then ``change`` runs, then the
    refresh goes on with what it read."""
    store.hold.clear()
    store.read.clear()
    task = asyncio.create_task(sync.refresh())
    await asyncio.to_thread(store.read.wait, 10)
    await change()
    store.hold.set()
    return await task


def test_a_refresh_read_before_an_unload_does_not_bring_the_adapter_back(tiny_llama, late):
    async def run():
        sync, store = make_sync(tiny_llama)
        await sync.start()
        await sync.load(sync.registry.check("late", str(late)), replace=False)
        applied = await stale_refresh(sync, store, lambda: sync.unload("late"))
        assert not applied
        assert sync.registry.get("late") is None and "late" not in store.table
        # the next refresh reads after the unload and agrees with it
        assert await sync.refresh()
        assert sync.registry.get("late") is None
        await sync.close()

    asyncio.run(run())


def test_a_refresh_read_before_a_load_does_not_remove_it(tiny_llama, late):
    async def run():
        sync, store = make_sync(tiny_llama)
        await sync.start()
        served = sync.registry.check("late", str(late))
        applied = await stale_refresh(sync, store, lambda: sync.load(served, replace=False))
        assert not applied
        assert sync.registry.get("late") == served
        assert await sync.refresh()
        assert sync.registry.get("late") == served
        await sync.close()

    asyncio.run(run())


def test_a_refresh_serves_what_another_ingress_loaded_and_drops_what_it_unloaded(
        tiny_llama, late):
    async def run():
        sync, store = make_sync(tiny_llama)
        await sync.start()
        other = sync.registry.check("late", str(late))
        store.put(StoredAdapter.of(other), replace=False)
        assert await sync.refresh()
        assert sync.registry.get("late") is not None
        store.delete("late")
        assert await sync.refresh()
        assert sync.registry.get("late") is None
        await sync.close()

    asyncio.run(run())
