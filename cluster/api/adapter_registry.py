"""The LoRA adapters an ingress serves, by the model name clients ask for.

A request's ``model`` is either a base model or an adapter's name; the
backends resolve it here (``AdapterRegistry.get``) inside their own model
lookup, so whatever maps a public name to a served name upstream of that
lookup (a route, say) reaches adapters the same way. Adapters come from
the operator YAML (``ModelSpec.adapters``) and from the runtime API
(``POST /v1/load_lora_adapter`` / ``unload_lora_adapter``,
``splitserve.cluster.api.adapters_api``); in a cluster the runtime ones are
shared by every ingress through ``splitserve.cluster.serve.adapter_store``.

Registering reads the adapter's config and safetensors header and checks
them against its base model (``splitserve.engine.lora.layout``: refused
features, projections, ranks up to ``max_lora_rank``) and takes the digest
of its files, which identifies it everywhere after (prefix-cache hashes,
replicas' caches). Replicas load the files themselves, from the same path,
when a request first needs them: the path must be readable on every node
that runs the model's pools.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitserve.engine.errors import AdapterError, SplitserveError
from splitserve.engine.lora.adapter import AdapterRef, check_name, describe_adapter

if TYPE_CHECKING:  # engine.config imports torch: processes that only route (the
    # router actor, through the metrics module) must not pay for it
    from splitserve.engine.config import ModelConfig


class AdapterConflict(SplitserveError):
    """An adapter name that is already served (409)."""


class UnknownAdapter(SplitserveError, LookupError):
    """No adapter is served under this name (404)."""


@dataclass(frozen=True)
class BaseFacts:
    """What checking an adapter needs of its base model."""

    model_cfg: ModelConfig
    max_loras: int  # 0: the model's replicas serve no adapters
    max_lora_rank: int


@dataclass(frozen=True)
class ServedAdapter:
    ref: AdapterRef
    base: str  # the served base model it runs on
    created: int  # unix seconds it was registered


class AdapterRegistry:
    """Adapter name -> its base model and ``AdapterRef``. Thread-safe:
    ``check`` reads files (run it off the event loop), the rest is a dict."""

    def __init__(self, bases: dict[str, BaseFacts]):
        self.bases = dict(bases)
        self._adapters: dict[str, ServedAdapter] = {}
        self._lock = threading.Lock()

    def base_for(self, base: str | None) -> str:
        """The base model an adapter loaded without one goes on: the only
        model whose replicas serve adapters."""
        serving = [n for n, b in self.bases.items() if b.max_loras > 0]
        if base is None:
            if len(serving) != 1:
                raise AdapterError(
                    "name the base model (base_model): "
                    + (f"adapters may go on {', '.join(serving)}" if serving else
                       "no model serves adapters: set max_loras on a model"), param="base_model")
            return serving[0]
        if base not in self.bases:
            raise AdapterError(f"base model {base!r} is not served; served: "
                               f"{', '.join(self.bases)}", param="base_model")
        if base not in serving:
            raise AdapterError(f"model {base!r} serves no adapters: set max_loras on it",
                               param="base_model")
        return base

    def check(self, name: str, path: str, base: str | None = None) -> ServedAdapter:
        """Read and check the adapter (its config, tensor header, tensor
        values and digest) without registering it. Raises AdapterError (400)."""
        from splitserve.engine.lora.layout import read_layout
        from splitserve.engine.lora.weights import check_adapter_values

        check_name(name)
        base = self.base_for(base)
        facts = self.bases[base]
        read_layout(path, facts.model_cfg, facts.max_lora_rank)
        check_adapter_values(path)
        return ServedAdapter(describe_adapter(name, path), base, int(time.time()))

    def add(self, served: ServedAdapter, replace: bool = False) -> None:
        """Serve ``served`` under its name. Raises AdapterConflict when the
        name is a base model's, or an adapter's and ``replace`` is off."""
        name = served.ref.name
        with self._lock:
            if name in self.bases:
                raise AdapterConflict(f"{name!r} is the name of a served base model")
            if name in self._adapters and not replace:
                raise AdapterConflict(f"an adapter named {name!r} is already loaded; unload it "
                                      "first, or load with load_inplace")
            self._adapters[name] = served

    def load(self, name: str, path: str, base: str | None = None,
             replace: bool = False) -> ServedAdapter:
        served = self.check(name, path, base)
        self.add(served, replace)
        return served

    def remove(self, name: str) -> ServedAdapter:
        with self._lock:
            served = self._adapters.pop(name, None)
        if served is None:
            raise UnknownAdapter(f"no adapter named {name!r} is loaded")
        return served

    def get(self, name: str) -> ServedAdapter | None:
        return self._adapters.get(name)

    def adapters(self) -> list[ServedAdapter]:
        with self._lock:
            return list(self._adapters.values())
