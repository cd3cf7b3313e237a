"""What an ingress and a router say to each other (the router's front door).

An ingress batches what it has to tell a router into one ``Exchange``:
requests to place (``RouteCall``), ends of requests (``LeaseEnd``),
replicas it found dead (``suspects``) and, every heartbeat, the whole list
of leases it holds (``live``). The router answers with one outcome per
call, in order: a ``Placement``, a refusal (``RouteRefusal``), or
``Queued``: the request waits in its model's queue, and its outcome comes
later from ``poll``. One exchange per round trip instead of one call per
request and one per release is what lets one router place thousands of
requests a second. The requests of one exchange are served in the order
the queue would serve them (resumed streams, priority, arrival).

The messages are frozen msgspec structs; between processes they travel
msgpack-encoded (``splitserve.router.exchange_codec``), not pickled.

A request's admission slot is a lease named by the ingress (``lease_id``,
unique per request) and held by that ingress (``holder``). It ends when
the ingress sends a ``LeaseEnd``, when the router refuses the request,
when a ``live`` list no longer names it, or when the holder has not been
heard from for ``RouterConfig.lease_ttl_s`` (the ingress died).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import msgspec

from splitserve.router.types import Placement, RouteRefusal, RouteRequest, RouterError


class RouteCall(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One request to place (again)."""

    lease_id: str
    request: RouteRequest
    arrival: float
    """Wall-clock seconds when the request first asked: its place in the queue."""
    waiting_since: float
    """Wall-clock seconds when this attempt started waiting: ``max_queue_delay_s``
    counts from here (kept when an ingress moves a waiting request to
    another router)."""
    deadline: float | None = None
    """The request's own deadline, wall-clock seconds (its client's timeout);
    it waits in the queue until the earlier of this and ``waiting_since +
    max_queue_delay_s``; None: only ``max_queue_delay_s``."""
    priority: int = 0
    """Lower goes first (vLLM's meaning; default 0); equal priorities in arrival order."""
    admitted: bool = False
    """The request already holds a slot (a retry after a replica failed, a
    stream resuming elsewhere, a request moved from a router that died): it
    is not counted against ``max_queue_per_model`` again, nor shed for a
    long predicted prefill wait."""
    traceparent: str | None = None
    """The W3C trace context of the ingress's placement span
    (``splitserve.handoff.tracing``): the router records its queue wait and
    decision under it. None: not traced."""
    resumed: bool = False
    """A stream that already produced tokens, placed again after its decode
    replica failed: it goes ahead of new requests in its model's queue and
    its wait is bounded by ``RouterConfig.max_resume_wait_s`` (and its own
    ``deadline``) instead of ``max_queue_delay_s``. Implies ``admitted``."""


class LeaseEnd(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A request ended for good: its slot is free."""

    lease_id: str
    output_tokens: int = -1
    """Tokens it produced when it finished normally (teaches the router the
    model's output lengths); -1: it failed or was cancelled."""
    elsewhere: bool = False
    """Sent to a router other than the one that placed it (that one is
    down): unknown here is not an unbalanced release."""


class Exchange(msgspec.Struct, frozen=True, array_like=True, gc=False):
    holder: str
    """The ingress process: its leases live and die together."""
    seen: str = ""
    """The router incarnation this holder last heard from ("" none): a
    release naming an unknown lease is only counted as unbalanced when the
    holder was talking to this incarnation."""
    calls: tuple[RouteCall, ...] = ()
    releases: tuple[LeaseEnd, ...] = ()
    suspects: tuple[str, ...] = ()
    """Replica ids an RPC just failed to reach: no placements until they push again."""
    live: dict[str, str] | None = None
    """Every lease the holder holds (lease id -> model), or None this time.
    The router adopts those it does not know (it restarted, or it takes
    over from a router that died) and ends those it holds that are not named."""
    groups: tuple[tuple[int, ...], ...] = ()
    """Calls that are one request's choices (n > 1), as indexes into
    ``calls``: admitted all or none. Their new slots are counted against
    ``max_queue_per_model`` together before any is taken; the first call
    decides the group (a refusal of it, e.g. shed for its predicted wait,
    refuses them all), and the others are then not shed."""


@dataclass(frozen=True, slots=True)
class Queued:
    """The request waits in its model's queue; ``RouterActor.poll`` brings its outcome."""


QUEUED = Queued()

Outcome = Union[Placement, RouteRefusal]


@dataclass(frozen=True, slots=True)
class ExchangeReply:
    incarnation: str
    """Changes when the router restarts or is reconfigured: its leases are gone."""
    outcomes: tuple[Outcome | Queued, ...]
    """One per ``Exchange.calls``, in order."""


class RouterUnavailableError(RouterError):
    """No router answered (all are down or restarting): the ingress's
    outcome of a call no router took (HTTP 503)."""
