"""The operations ledger: a small named actor holding the config last applied
(so ``splitserve deploy`` can say what an edit changes), each pool's
latest autoscaling decision (so ``splitserve status`` can say why a pool has
the size it has) and, bounded, the decisions at which a pool's target or
running replica count changed (``splitserve status --history``: the pool's
size over time).

Written by ``splitserve.cluster.serve.app.deploy`` and by the autoscaling policy, which runs
inside the Serve controller; read by the CLI. It also holds the deploy lease
(``begin_deploy``): one deploy at a time changes the cluster.

Ray restarts it wherever it can (``max_restarts=-1``), e.g. after the node
it ran on was lost. The config last applied (with its secrets' digest and
when it was applied) is also written to Ray's internal key-value store,
which lives in the GCS on the head node, and a restarted ledger reads it
back: ``splitserve status`` and the next deploy's diff still know the
cluster. The decisions and their history are lost with it (they refill
at the autoscaler's next tick), and so is the deploy lease (the next deploy
then takes it).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import deque
from typing import Any

import ray

from splitserve.cluster.autoscaling.records import DecisionRecord, PoolDecisions

LEDGER_NAME = "splitserve-ops-ledger"
HISTORY_LEN = 1000  # size changes kept per pool (oldest dropped first)
NAMESPACE = "splitserve"
_KV_KEY = b"ops_ledger_config"  # (config, secrets_version, applied_at), pickled

log = logging.getLogger(__name__)


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _load_applied() -> tuple[dict[str, Any] | None, str | None, float | None]:
    """What ``OpsLedger.set_config`` last wrote; (None, None, None) when nothing
    (or outside Ray, where the ledger runs as a plain object in tests)."""
    kv = _kv()
    if not kv._internal_kv_initialized():
        return None, None, None
    raw = kv._internal_kv_get(_KV_KEY, namespace=NAMESPACE)
    if raw is None:
        return None, None, None
    try:
        cfg, version, at = pickle.loads(raw)
        return cfg, version, at
    except Exception:  # noqa: BLE001 - written by an incompatible version: start empty
        log.exception("the ops ledger's saved config is unreadable; starting empty")
        return None, None, None


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class OpsLedger:
    def __init__(self, history_len: int = HISTORY_LEN) -> None:
        self._history_len = history_len
        self._deploy: tuple[str, float, float] | None = None  # (holder, since, expires)
        self._forget_all()
        # restarted (its node lost): the config applied before
        self._config, self._secrets_version, self._applied_at = _load_applied()

    def reset(self) -> None:
        """Forget everything (the cluster it described was shut down)."""
        self._forget_all()
        if _kv()._internal_kv_initialized():
            _kv()._internal_kv_del(_KV_KEY, namespace=NAMESPACE)

    def _forget_all(self) -> None:
        self._config: dict[str, Any] | None = None
        self._secrets_version: str | None = None
        self._applied_at: float | None = None
        self._decisions: dict[str, DecisionRecord] = {}  # app -> latest decision
        self._changes: dict[str, DecisionRecord] = {}  # app -> latest that changed the size
        self._history: dict[str, deque[DecisionRecord]] = {}  # app -> target/running changes

    def begin_deploy(self, holder: str, ttl_s: float) -> tuple[str, float] | None:
        """Take the deploy lease for ``holder`` until ``ttl_s`` from now
        (its deploy's own time limit): None when taken, else (the holder,
        wall-clock since) of the deploy still running. A lease past its
        expiry (a deploy that died) is taken over."""
        now = time.time()
        if self._deploy is not None and self._deploy[0] != holder and self._deploy[2] > now:
            return self._deploy[0], self._deploy[1]
        self._deploy = (holder, now, now + ttl_s)
        return None

    def end_deploy(self, holder: str) -> None:
        """Give the lease back (only ``holder``'s own)."""
        if self._deploy is not None and self._deploy[0] == holder:
            self._deploy = None

    def set_config(self, cfg: dict[str, Any], secrets_version: str | None = None) -> None:
        """``cfg`` without its secrets; ``secrets_version`` their digest."""
        self._config = cfg
        self._secrets_version = secrets_version
        self._applied_at = time.time()
        if _kv()._internal_kv_initialized():
            _kv()._internal_kv_put(
                _KV_KEY, pickle.dumps((cfg, secrets_version, self._applied_at)),
                overwrite=True, namespace=NAMESPACE)

    def secrets_version(self) -> str | None:
        return self._secrets_version

    def config(self) -> dict[str, Any] | None:
        return self._config

    def applied_at(self) -> float | None:
        return self._applied_at

    def record_decision(self, app: str, decision: DecisionRecord) -> None:
        prev = self._decisions.get(app)
        self._decisions[app] = decision
        if decision.changed:
            self._changes[app] = decision
        if prev is None or decision.changed or (prev.target, prev.running) != (
                decision.target, decision.running):
            self._history.setdefault(app, deque(maxlen=self._history_len)).append(decision)

    def decisions(self) -> dict[str, PoolDecisions]:
        """app -> its latest decision and the latest that changed its size."""
        return {app: PoolDecisions(latest=d, last_change=self._changes.get(app))
                for app, d in self._decisions.items()}

    def history(self) -> dict[str, list[DecisionRecord]]:
        """app -> the decisions at which its target or running count changed
        (and its first), oldest first."""
        return {app: list(h) for app, h in self._history.items()}

    def forget(self, app: str) -> None:
        self._decisions.pop(app, None)
        self._changes.pop(app, None)
        self._history.pop(app, None)


def get_ledger(create: bool = False):
    """The cluster's ledger; created (detached) when ``create`` is set.
    Raises ValueError when it does not exist and ``create`` is not set."""
    try:
        return ray.get_actor(LEDGER_NAME, namespace=NAMESPACE)
    except ValueError:
        if not create:
            raise
    return OpsLedger.options(name=LEDGER_NAME, namespace=NAMESPACE, lifetime="detached",
                             get_if_exists=True).remote()
