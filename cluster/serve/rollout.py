"""Whether every ingress replica serves the config the cluster is deployed with.

While Serve rolls the ingress to a new config (a model added, a setting
changed), replicas of the old and the new config take requests side by
side, one at a time replaced: an old replica answers 404 for a model it was
not built with, even after a new one found every pool live. So an ingress
replica is ready (``/ready``, gRPC health) only when

- its own config is the cluster's target: the one the ingress builder
  (``splitserve.cluster.serve.ingress.ingress_app``) published last, and
- every ingress replica heard from in the last ``TTL_S`` serves it too.

Each replica registers itself every ``BEAT_S`` (``IngressRollout``) in the
GCS's internal key-value store and removes its entry when it stops; the
entry of a replica that was killed ages out after ``TTL_S`` (ages are
wall-clock seconds: the nodes' clocks are assumed synchronised to well
under a second). A config is named by its digest (``ingress_digest``): the
settings the ingress uses (``ingress_view``) and the secrets' version.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from splitserve.cluster.config import ClusterConfig

log = logging.getLogger("splitserve.rollout")

_NAMESPACE = "splitserve"
_TARGET_KEY = b"ingress/target"
_REPLICA_PREFIX = b"ingress/replica/"
BEAT_S = 1.0  # how often a replica registers itself and reads the others
TTL_S = 5.0  # an entry older than this is a replica that is gone


def ingress_view(cfg: ClusterConfig) -> dict[str, Any]:
    """The settings an ingress replica uses: everything but the pools, the
    number of ingress replicas (Serve scales the ingress without replacing
    its replicas), the routes (the ingresses follow the route controller)
    and the secrets (their version is compared on its own)."""
    from splitserve.cluster.serve.secrets import public_config

    d = public_config(cfg)
    d.pop("routes")
    for m in d["models"]:
        m.pop("prefill")
        m.pop("decode")
    d["endpoints"].pop("ingress_replicas")
    drop_unread_endpoints(d["endpoints"])
    return d


def drop_unread_endpoints(endpoints: dict[str, Any]) -> None:
    """Take out of an ingress' ``endpoints`` the settings its HTTP server
    mode does not read, so that changing one replaces no replica: behind
    Serve's proxy (``http_server: proxy``) the request-head deadline is the
    proxy's, not the ingress's."""
    if endpoints.get("http_server") == "proxy":
        endpoints.pop("head_timeout_s", None)


def ingress_digest(cfg: ClusterConfig, secrets_version: str) -> str:
    """The name of the ingress config ``cfg`` with secrets ``secrets_version``."""
    text = json.dumps(ingress_view(cfg), sort_keys=True, default=str) + "\0" + secrets_version
    return hashlib.blake2b(text.encode(), digest_size=8, person=b"splitserve-ing").hexdigest()


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def publish_target(digest: str) -> None:
    """The ingress config the cluster is being deployed with (the builder's)."""
    _kv()._internal_kv_put(_TARGET_KEY, digest.encode(), overwrite=True, namespace=_NAMESPACE)


def target() -> str | None:
    """The published target, if any."""
    raw = _kv()._internal_kv_get(_TARGET_KEY, namespace=_NAMESPACE)
    return raw.decode() if raw else None


def clear() -> None:
    """Forget the target and every registration (the cluster was shut down)."""
    kv = _kv()
    kv._internal_kv_del(_TARGET_KEY, namespace=_NAMESPACE)
    kv._internal_kv_del(_REPLICA_PREFIX, del_by_prefix=True, namespace=_NAMESPACE)


@dataclass(frozen=True)
class Registration:
    digest: str
    at: float  # wall-clock seconds of its last beat


def rollout_problems(mine: str, target: str | None, replicas: Mapping[str, Registration],
                     now: float, ttl_s: float = TTL_S, me: str = "") -> list[str]:
    """Why this replica (``me``, serving config ``mine``) is not ready as
    far as the rollout goes; empty: it is. ``target`` None: no builder
    published one (an ingress deployed by hand), only the replicas are
    compared."""
    out = []
    if target is not None and mine != target:
        out.append(f"this ingress replica serves config {mine}, the cluster is deployed "
                   f"with {target}: it is being replaced")
    want = target or mine
    stale = sorted(rid for rid, r in replicas.items()
                   if rid != me and r.digest != want and now - r.at < ttl_s)
    if stale:
        out.append(f"{len(stale)} ingress replica(s) still serve an earlier config "
                   f"({', '.join(stale[:3])}): the ingress is being rolled out")
    return out


class IngressRollout:
    """One ingress replica's registration and its view of the rollout.
    ``beat`` blocks (GCS calls); ``problems`` beats in a thread first, so a
    target published a moment ago counts (callers at the same time share
    one beat)."""

    def __init__(self, digest: str):
        self.digest = digest
        self.replica_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._key = _REPLICA_PREFIX + self.replica_id.encode()
        self._problems: list[str] = ["this ingress replica has not registered yet"]
        self._task: asyncio.Task | None = None
        self._beating: asyncio.Future | None = None

    async def problems(self) -> list[str]:
        if self._beating is None or self._beating.done():
            self._beating = asyncio.ensure_future(self._beat_safely())
        await asyncio.shield(self._beating)
        return list(self._problems)

    async def _beat_safely(self) -> None:
        try:
            await asyncio.to_thread(self.beat)
        except Exception as e:  # noqa: BLE001 - the GCS is unreachable: not ready
            self._problems = [f"the ingress registry is unreachable: {type(e).__name__}"]
            log.warning("ingress registration failed: %r", e)

    def beat(self) -> None:
        """Register (again) and read the target and the other replicas."""
        kv, now = _kv(), time.time()
        kv._internal_kv_put(self._key, json.dumps({"digest": self.digest, "at": now}).encode(),
                            overwrite=True, namespace=_NAMESPACE)
        published = target()
        replicas = {}
        for key in kv._internal_kv_list(_REPLICA_PREFIX, namespace=_NAMESPACE):
            raw = kv._internal_kv_get(key, namespace=_NAMESPACE)
            if raw is None:
                continue  # removed meanwhile
            d = json.loads(raw)
            replicas[key[len(_REPLICA_PREFIX):].decode()] = Registration(d["digest"], d["at"])
        self._problems = rollout_problems(self.digest, published,
                                          replicas, time.time(), me=self.replica_id)

    def start(self) -> None:
        """Beat every ``BEAT_S`` on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(BEAT_S)
            await self._beat_safely()

    def stop(self) -> None:
        """Unregister (blocking): this replica stops taking requests."""
        if self._task is not None:
            self._task.cancel()
        _kv()._internal_kv_del(self._key, namespace=_NAMESPACE)
