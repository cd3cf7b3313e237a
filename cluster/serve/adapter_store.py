"""Runtime-loaded LoRA adapters, shared by every ingress replica.

``POST /v1/load_lora_adapter`` on any ingress replica writes the adapter to
Ray's internal key-value store (the GCS, namespace ``splitserve``), one key
per adapter (``lora_adapter/<name>``), and ``unload_lora_adapter`` deletes
it. Each ingress (``AdapterSync``) reads the table when it starts, so one
that Serve restarts or adds serves the adapters loaded before it, and again
every period: an adapter loaded or unloaded through another replica is
served, or gone, here within that period. Adding a key only when it is
absent is atomic in the store, so two replicas loading one name at once
cannot both succeed (the second gets 409).

The operator's adapters (``ModelSpec.adapters``) are not stored: every
ingress registers them from the config, and the runtime API neither unloads
nor replaces them. ``splitserve.cluster.serve.app.shutdown`` clears the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec

from splitserve.cluster.api.adapter_registry import (AdapterConflict, AdapterRegistry,
                                                     ServedAdapter)
from splitserve.engine.errors import SplitserveError
from splitserve.engine.lora.adapter import AdapterRef

log = logging.getLogger("splitserve.adapters")

NAMESPACE = "splitserve"
_PREFIX = b"lora_adapter/"


class StoredAdapter(msgspec.Struct, frozen=True):
    """One runtime-loaded adapter as the key-value store keeps it."""

    name: str
    path: str
    digest: str  # of its files when it was loaded (``AdapterRef.digest``)
    base: str  # the served base model it runs on
    created: int  # unix seconds it was loaded: a reload under the name changes it

    @classmethod
    def of(cls, served: ServedAdapter) -> "StoredAdapter":
        r = served.ref
        return cls(r.name, r.path, r.digest, served.base, served.created)

    def served(self) -> ServedAdapter:
        return ServedAdapter(AdapterRef(self.name, self.path, self.digest), self.base, self.created)


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _key(name: str) -> bytes:
    return _PREFIX + name.encode()


class AdapterStore:
    """The table in the key-value store. Every call blocks on the GCS: run
    it off the event loop."""

    def put(self, a: StoredAdapter, replace: bool) -> bool:
        """Store ``a``; with ``replace`` off only when its name is free.
        Returns whether it was stored."""
        existed = _kv()._internal_kv_put(_key(a.name), msgspec.msgpack.encode(a),
                                         overwrite=replace, namespace=NAMESPACE)
        return replace or not existed

    def delete(self, name: str) -> bool:
        """Whether an adapter of that name was stored."""
        return _kv()._internal_kv_del(_key(name), namespace=NAMESPACE) > 0

    def all(self) -> dict[str, StoredAdapter]:
        kv = _kv()
        out: dict[str, StoredAdapter] = {}
        for key in kv._internal_kv_list(_PREFIX, namespace=NAMESPACE):
            data = kv._internal_kv_get(key, namespace=NAMESPACE)
            if data is None:  # unloaded between the listing and the read
                continue
            try:
                a = msgspec.msgpack.decode(data, type=StoredAdapter)
            except msgspec.DecodeError:
                log.warning("unreadable adapter entry %r in the key-value store; skipped", key)
                continue
            out[a.name] = a
        return out

    def clear(self) -> None:
        _kv()._internal_kv_del(_PREFIX, del_by_prefix=True, namespace=NAMESPACE)


def clear_adapters() -> None:
    """Forget every runtime-loaded adapter (the cluster is shut down)."""
    with contextlib.suppress(Exception):  # not connected: nothing stored here
        AdapterStore().clear()


class AdapterSync:
    """Keeps one ingress's ``AdapterRegistry`` equal to the operator's
    adapters (``configured``) plus the store's, and writes the runtime
    API's loads and unloads to the store. One lock orders a load or unload
    against a refresh's changes, and a refresh whose read of the store began
    before a load or unload here is dropped (the next one reads after it):
    a stale read would otherwise bring back an adapter just unloaded, or
    remove one just loaded."""

    def __init__(self, registry: AdapterRegistry, configured: set[str],
                 store: AdapterStore, period_s: float):
        self.registry = registry
        self.configured = frozenset(configured)
        self.store = store
        self.period_s = period_s
        self.lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._skipped: dict[str, StoredAdapter] = {}  # entries this ingress cannot serve
        self._changes = 0  # loads and unloads through this ingress so far

    async def start(self) -> None:
        """The stored adapters now, then refreshed every period."""
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the GCS away a moment: keep what is served
                log.warning("reading the stored adapters failed", exc_info=True)

    async def refresh(self) -> bool:
        """Serve what the store holds. False (nothing changed) when a load or
        unload here overtook the read."""
        seen = self._changes
        stored = await asyncio.to_thread(self.store.all)
        async with self.lock:
            if self._changes != seen:
                return False
            await self._apply(stored)
            return True

    async def _apply(self, stored: dict[str, StoredAdapter]) -> None:
        reg = self.registry
        for name, a in stored.items():
            if name in self.configured:  # the config took the name since: it wins
                continue
            local = reg.get(name)
            if local is not None and StoredAdapter.of(local) == a:
                continue
            if self._skipped.get(name) == a:
                continue
            try:  # the files and the base model as this ingress sees them
                checked = await asyncio.to_thread(reg.check, name, a.path, a.base)
                if checked.ref.digest != a.digest:
                    raise SplitserveError("its files changed since it was loaded; load it again")
            except SplitserveError as e:
                log.warning("stored adapter %r is not served here: %s", name, e)
                self._skipped[name] = a
                if local is not None:
                    reg.remove(name)
                continue
            reg.add(a.served(), replace=True)
        for served in reg.adapters():
            name = served.ref.name
            if name not in self.configured and name not in stored:
                reg.remove(name)  # unloaded through another ingress
        self._skipped = {n: a for n, a in self._skipped.items() if stored.get(n) == a}

    async def load(self, served: ServedAdapter, replace: bool) -> None:
        """Store and serve ``served`` (already checked). Raises AdapterConflict."""
        name = served.ref.name
        if name in self.configured:
            raise AdapterConflict(f"{name!r} is an adapter of the operator config; change it "
                                  "there (models[].model.adapters)")
        async with self.lock:
            if not replace and self.registry.get(name) is not None:
                raise AdapterConflict(f"an adapter named {name!r} is already loaded; unload it "
                                      "first, or load with load_inplace")
            if name in self.registry.bases:
                raise AdapterConflict(f"{name!r} is the name of a served base model")
            self._changes += 1
            if not await asyncio.to_thread(self.store.put, StoredAdapter.of(served), replace):
                raise AdapterConflict(f"an adapter named {name!r} was just loaded through "
                                      "another ingress; unload it first, or load with "
                                      "load_inplace")
            self.registry.add(served, replace=True)

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` here and everywhere. Raises UnknownAdapter,
        or AdapterConflict for an adapter of the operator config."""
        if name in self.configured:
            raise AdapterConflict(f"{name!r} is an adapter of the operator config; remove it "
                                  "there (models[].model.adapters)")
        async with self.lock:
            self._changes += 1
            deleted = await asyncio.to_thread(self.store.delete, name)
            try:
                self.registry.remove(name)
            except LookupError:
                if not deleted:  # neither here nor loaded through another ingress
                    raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
