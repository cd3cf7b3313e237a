"""The adapters one engine serves by name.

``AdapterRegistry`` is the engine's door to its LoRA manager:
``LLMEngine.add_adapter`` / ``remove_adapter`` / ``resolve_adapter`` call
``add`` / ``remove`` / ``resolve``. An adapter added by name is read now
and stays in host memory until removed; a request may also name an
adapter by a reference it carries (a cluster request), which is read on
demand. An engine started with ``max_loras == 0`` has no manager, and
every call that needs one raises AdapterUnavailableError.
"""

from __future__ import annotations

from splitserve.engine.lora.adapter import (AdapterRef, AdapterUnavailableError,
                                            UnknownAdapterError, describe_adapter)
from splitserve.engine.lora.manager import LoraManager


class AdapterRegistry:
    def __init__(self, lora: LoraManager | None):
        self.lora = lora
        self.by_name: dict[str, AdapterRef] = {}  # registered by name (add)

    def add(self, name: str, path: str) -> AdapterRef:
        """Serve the PEFT adapter in folder ``path`` as ``name`` (read now;
        AdapterError when it cannot be served on this model)."""
        lora = self._lora()
        ref = describe_adapter(name, path)
        lora.install(lora.read(ref))
        self.by_name[ref.name] = ref
        return ref

    def remove(self, name: str) -> bool:
        """Stop serving adapter ``name``; requests already running with it
        finish. Whether it was served."""
        ref = self.by_name.pop(name, None)
        if ref is None:
            return False
        if self.lora is not None and all(r.key != ref.key for r in self.by_name.values()):
            self.lora.drop(ref.key)
        return True

    def resolve(self, adapter: "str | AdapterRef | None") -> AdapterRef | None:
        """A request's adapter: by name (``add``), or a reference the
        caller holds (a cluster request), made ready in host memory. Raises
        UnknownAdapterError, or AdapterUnavailableError when this engine
        serves no adapters or cannot read its files."""
        if adapter is None:
            return None
        lora = self._lora()
        if isinstance(adapter, str):
            ref = self.by_name.get(adapter)
            if ref is None:
                raise UnknownAdapterError(f"adapter {adapter!r} is not loaded here; loaded: "
                                          f"{', '.join(self.by_name) or 'none'}")
        else:
            ref = adapter
        lora.ensure(ref)
        return ref

    def load(self) -> dict:
        """The LoRA fields of ``EngineLoad`` (none without a manager)."""
        if self.lora is None:
            return {}
        return dict(lora_slots=self.lora.num_slots, lora_slots_in_use=self.lora.table.in_use,
                    adapters=self.lora.resident_keys(), host_adapters=self.lora.host_keys())

    def _lora(self) -> LoraManager:
        if self.lora is None:
            raise AdapterUnavailableError("this engine serves no LoRA adapters: start it with "
                                          "max_loras > 0")
        return self.lora
