"""The operations ledger: a small named actor holding the config last applied
(so ``splitserve deploy`` can say what an edit changes) and each pool's
latest autoscaling decision (so ``splitserve status`` can say why a pool has
the size it has).

Written by ``splitserve.cluster.serve.app.deploy`` and by the autoscaling policy, which runs
inside the Serve controller; read by the CLI. Losing it loses only history.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from splitserve.cluster.autoscaling.records import DecisionRecord, PoolDecisions

LEDGER_NAME = "splitserve-ops-ledger"
NAMESPACE = "splitserve"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class OpsLedger:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (the cluster it described was shut down)."""
        self._config: dict[str, Any] | None = None
        self._secrets_version: str | None = None
        self._applied_at: float | None = None
        self._decisions: dict[str, DecisionRecord] = {}  # app -> latest decision
        self._changes: dict[str, DecisionRecord] = {}  # app -> latest that changed the size

    def set_config(self, cfg: dict[str, Any], secrets_version: str | None = None) -> None:
        """``cfg`` without its secrets; ``secrets_version`` their digest."""
        self._config = cfg
        self._secrets_version = secrets_version
        self._applied_at = time.time()

    def secrets_version(self) -> str | None:
        return self._secrets_version

    def config(self) -> dict[str, Any] | None:
        return self._config

    def applied_at(self) -> float | None:
        return self._applied_at

    def record_decision(self, app: str, decision: DecisionRecord) -> None:
        self._decisions[app] = decision
        if decision.changed:
            self._changes[app] = decision

    def decisions(self) -> dict[str, PoolDecisions]:
        """app -> its latest decision and the latest that changed its size."""
        return {app: PoolDecisions(latest=d, last_change=self._changes.get(app))
                for app, d in self._decisions.items()}

    def forget(self, app: str) -> None:
        self._decisions.pop(app, None)
        self._changes.pop(app, None)


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
