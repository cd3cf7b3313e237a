"""Where autoscaling decisions go besides Serve: the ops ledger (for
``splitserve status``) and, for the network bottleneck, the router's
prefer-local-prefill switch.

Runs inside the Serve controller on every control-loop tick, so it never
blocks: actor handles are looked up once (again after a failure, at most
every ``LOOKUP_RETRY_S``) and calls are fire-and-forget.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from splitserve.cluster.autoscaling.records import DecisionRecord

log = logging.getLogger("splitserve.autoscaling")

LOOKUP_RETRY_S = 10.0


class _Handle:
    """A named actor's handle, looked up lazily and forgotten on failure."""

    def __init__(self, lookup: Callable[[], Any]):
        self._lookup = lookup
        self._handle = None
        self._failed_at = float("-inf")

    def call(self, method: str, *args: Any) -> bool:
        import ray

        if not ray.is_initialized():  # get_actor would start a local Ray instance
            return False
        now = time.monotonic()
        if self._handle is None:
            if now - self._failed_at < LOOKUP_RETRY_S:
                return False
            try:
                self._handle = self._lookup()
            except Exception:  # noqa: BLE001 - not created (yet): try again later
                self._failed_at = now
                return False
        try:
            getattr(self._handle, method).remote(*args)
            return True
        except Exception as e:  # noqa: BLE001 - the actor died: look it up again
            log.debug("call %s failed: %r", method, e)
            self._handle, self._failed_at = None, now
            return False


def _ledger():
    from splitserve.cluster.autoscaling.ledger import get_ledger

    return get_ledger()


def _router():
    from splitserve.cluster.serve.router_actor import get_router

    return get_router()


_LEDGER = _Handle(_ledger)
_ROUTER = _Handle(_router)


def record_decision(app: str, decision: DecisionRecord) -> bool:
    return _LEDGER.call("record_decision", app, decision)


def set_prefer_local_prefill(prefer: bool) -> bool:
    return _ROUTER.call("set_prefer_local_prefill", prefer)
