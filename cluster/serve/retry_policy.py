"""Whether a request whose decode replica failed is placed again, and where not.

``ClusterBackend.generate`` (``splitserve.cluster.serve.orchestrator``)
keeps one ``Attempts`` per request and calls ``Attempts.after_failure`` when
a decode replica's Generate call fails: it either raises the request's
client-facing error or excludes that replica, so the next placement (its
``RouteRequest.exclude_replicas`` and ``refused_by``) goes elsewhere.

A failure that may be the request's own doing (the engine failed it alone,
REQUEST_FAILED; the engine died while running it, ENGINE_DEAD; any other
internal error) moves it to another replica at most once: a request that
breaks every engine it meets cannot walk through the pool. A replica that
stops answering (UNAVAILABLE, a cut stream) is no such sign, and its
requests move as often as ``router.max_retries`` allows.
"""

from __future__ import annotations

import dataclasses

import grpc

from splitserve.cluster.api.backend import Overloaded, Unavailable
from splitserve.engine.errors import RequestFailedError
from splitserve.handoff.messages import ErrorKind
from splitserve.handoff.rpc import RpcError

# A decode replica that fails with one of these before it produced any token
# of the request is skipped and the request placed again; so is one that
# refuses a resumed stream (its KV room had looked larger than it was: the
# dead replica's streams all land on the survivors at once).
_RETRY_BEFORE_FIRST = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION}
# After a replica produced tokens, only its death justifies resuming elsewhere.
_RESUME_AFTER = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                 grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# Failures that may be the request's own doing: moved elsewhere at most
# MAX_FAULT_RESUMES times.
_FAULT_KINDS = {ErrorKind.REQUEST_FAILED, ErrorKind.ENGINE_DEAD, ErrorKind.INTERNAL}
MAX_FAULT_RESUMES = 1


def is_request_fault(e: RpcError) -> bool:
    """Whether a failed Generate call may have been caused by its request:
    the worker answered with a fault kind, or with an internal status and
    no kind at all. An unreachable replica (no answer) is not one."""
    if e.kind is not None:
        return e.kind in _FAULT_KINDS
    return e.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@dataclasses.dataclass
class Attempts:
    """One request's tries at decode replicas."""

    request_id: str
    left: int  # placements still allowed: router.max_retries + 1 at first
    counters: dict[str, int]  # ClusterBackend.counters: "faults", "failed"
    faults: int = 0  # failed calls that may be this request's own doing
    exclude: set[str] = dataclasses.field(default_factory=set)
    # of exclude, those that refused it for want of KV room
    refused: set[str] = dataclasses.field(default_factory=set)

    def after_failure(self, e: RpcError, decode: str, produced_here: bool) -> None:
        """Decode replica ``decode`` failed the request's Generate call
        (``produced_here``: after it streamed some of its tokens). Raises the
        request's error when it may not move; else ``decode`` is excluded
        from its next placement, and remembered among the replicas that
        refused it for room when it is alive (the router may come back)."""
        retry = _RESUME_AFTER if produced_here else _RETRY_BEFORE_FIRST
        if e.kind is ErrorKind.ADAPTER_UNAVAILABLE:  # another replica may read it
            retry = retry | {grpc.StatusCode.FAILED_PRECONDITION}
        self.left -= 1
        if is_request_fault(e):
            self.faults += 1
            self.counters["faults"] += 1
            if self.faults > MAX_FAULT_RESUMES:
                self.counters["failed"] += 1
                raise RequestFailedError(
                    f"request {self.request_id} failed on {self.faults} decode replicas, last "
                    f"on {decode}: {e.message}", self.request_id) from None
        if e.code not in retry or self.left <= 0:
            if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Overloaded(f"no decode replica could hold the request: {e.message}",
                                 1.0) from None
            raise Unavailable(f"generation failed on {decode}: {e.message}") from None
        self.exclude.add(decode)
        if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.refused.add(decode)  # alive: the router may come back to it
        else:
            self.refused.discard(decode)
