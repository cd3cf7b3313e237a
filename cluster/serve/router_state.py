"""What a router actor finds again after Ray restarts it.

Ray restarts a router actor (``max_restarts=-1``) by running its
constructor with the arguments it was first created with. Three things set
later would be lost that way: the config of a later ``reconfigure`` (a
redeploy that added a model: the restarted router would refuse that model
as unknown), the autoscaler's prefer-local-prefill switch (network
bottleneck) and the TLS its stream serves (``transfer.tls``, set by
``set_stream_tls`` on every deploy). They live here, in the GCS's internal key-value store under
the splitserve namespace, which outlives every actor of the cluster:

- ``save_config`` when a router is created (first start) or reconfigured;
  every router of a cluster gets the same config, so there is one entry;
- ``save_prefer_local`` when the switch changes (cluster-wide, one entry);
- ``save_stream_tls`` when a deploy changes ``transfer.tls`` (one entry);
- ``load`` in a restarted router's constructor;
- ``clear`` when the routers are removed (``kill_routers``), so a later
  cluster on the same Ray instance does not start from this one's state.

Only processes that can run code on the Ray cluster can read the store
(as for ``splitserve.cluster.serve.secrets``). The config is a plain,
frozen dataclass (``RouterConfig``) pickled by its own module's class.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

from splitserve.router.config import RouterConfig

_NAMESPACE = "splitserve"
_CONFIG_KEY = b"router/config"
_PREFER_LOCAL_KEY = b"router/prefer_local_prefill"
_TLS_KEY = b"router/stream_tls"


@dataclass(frozen=True)
class RouterState:
    config: RouterConfig | None
    """The routers' config as last set; None: none stored."""
    prefer_local_prefill: bool = False
    stream_tls: dict | None = None
    """The ``transfer.tls`` section (as a dict) the routers' streams serve."""
    stream_tls_stored: bool = False
    """Whether ``stream_tls`` was stored (else a router keeps its own)."""


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def save_config(cfg: RouterConfig) -> None:
    _kv()._internal_kv_put(_CONFIG_KEY, pickle.dumps(cfg), overwrite=True, namespace=_NAMESPACE)


def save_prefer_local(prefer: bool) -> None:
    _kv()._internal_kv_put(_PREFER_LOCAL_KEY, b"1" if prefer else b"0", overwrite=True,
                           namespace=_NAMESPACE)


def save_stream_tls(tls: dict | None) -> None:
    _kv()._internal_kv_put(_TLS_KEY, pickle.dumps(tls), overwrite=True, namespace=_NAMESPACE)


def load() -> RouterState:
    kv = _kv()
    raw = kv._internal_kv_get(_CONFIG_KEY, namespace=_NAMESPACE)
    cfg = pickle.loads(raw) if raw else None
    if cfg is not None and not isinstance(cfg, RouterConfig):
        cfg = None  # written by an incompatible version: the constructor's own config serves
    prefer = kv._internal_kv_get(_PREFER_LOCAL_KEY, namespace=_NAMESPACE) == b"1"
    raw = kv._internal_kv_get(_TLS_KEY, namespace=_NAMESPACE)
    tls = pickle.loads(raw) if raw else None
    stored = bool(raw) and (tls is None or isinstance(tls, dict))
    return RouterState(cfg, prefer, tls if stored else None, stored)


def clear() -> None:
    kv = _kv()
    for key in (_CONFIG_KEY, _PREFER_LOCAL_KEY, _TLS_KEY):
        kv._internal_kv_del(key, namespace=_NAMESPACE)
