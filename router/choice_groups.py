"""All-or-none admission of one request's choices (n > 1) at the router.

``RouterService.exchange`` hands an exchange that carries ``Exchange.groups``
to ``submit_grouped``: the calls are served in queue order (resumed streams,
priority, arrival), each group where its first member comes, and a group's
new slots are admitted together or refused together. Single calls go through
the service's ``_submit`` as on the n = 1 path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from splitserve.router.exchange import Outcome, Queued, RouteCall
from splitserve.router.types import (
    NoReplicaError,
    OverloadedError,
    Placement,
    QueueDelayError,
    QueueTimeoutError,
    RouteRefusal,
    UnknownModelError,
)

if TYPE_CHECKING:
    from splitserve.router.service import RouterService

# refusal reason labels (metrics, counters)
OVERLOADED, QUEUE_DELAY, QUEUE_TIMEOUT = "overloaded", "queue_delay", "queue_timeout"
NO_REPLICA, NO_CAPACITY = "no_replica", "no_capacity"


def refusal_reason(err: RouteRefusal) -> str:
    """The refusal's reason label (metrics)."""
    return (OVERLOADED if isinstance(err, OverloadedError)
            else NO_REPLICA if isinstance(err, NoReplicaError)
            else QUEUE_TIMEOUT if isinstance(err, QueueTimeoutError)
            else QUEUE_DELAY if isinstance(err, QueueDelayError) else NO_CAPACITY)


def submit_grouped(svc: RouterService, holder: str, calls: tuple[RouteCall, ...],
                   groups: tuple[tuple[int, ...], ...], now: float) -> tuple:
    """``RouterService.exchange``'s calls when some are one request's choices:
    served in queue order, each group where its first member comes."""
    group_of: dict[int, tuple[int, ...]] = {}
    for g in groups:
        if all(0 <= i < len(calls) and i not in group_of for i in g):
            group_of.update(dict.fromkeys(g, g))  # a malformed group: its calls alone
    outcomes: list[Outcome | Queued | None] = [None] * len(calls)
    for i in sorted(range(len(calls)), key=lambda i: (not calls[i].resumed,
                                                      calls[i].priority, calls[i].arrival)):
        if outcomes[i] is not None:
            continue
        g = group_of.get(i)
        if g is None:
            outcomes[i] = svc._submit(holder, calls[i], now)
            continue
        for j, out in zip(g, submit_group(svc, holder, [calls[j] for j in g], now)):
            outcomes[j] = out
    return tuple(outcomes)


def submit_group(svc: RouterService, holder: str, members: list[RouteCall],
                 now: float) -> list[Outcome | Queued]:
    """One request's choices, all or none: their new slots are checked
    together before any is taken, the first new one is submitted as any
    request (placed, queued, or refused: then all are), and the others
    follow as admitted (not shed: the request was taken). A member that
    already holds a slot (a retry, a moved request) goes alone."""
    model = members[0].request.model
    fresh = [k for k, c in enumerate(members) if not (c.admitted or c.resumed)
             and c.request.model == model and c.lease_id not in svc.leases]
    outcomes: list[Outcome | Queued | None] = [None] * len(members)
    if len(fresh) > 1 and svc.serves(model):
        try:
            svc.core.check_room(model, len(fresh))
        except OverloadedError as e:
            for k in fresh:
                outcomes[k] = e
                svc._count_refusal(model, OVERLOADED)
    if fresh and outcomes[fresh[0]] is None:
        first = outcomes[fresh[0]] = svc._submit(holder, members[fresh[0]], now)
        taken = isinstance(first, (Placement, Queued))
        for k in fresh[1:]:
            if taken:
                outcomes[k] = svc._submit(
                    holder, msgspec.structs.replace(members[k], admitted=True), now)
            else:  # the request was refused: so are its other choices
                outcomes[k] = first
                if not isinstance(first, UnknownModelError):
                    svc._count_refusal(model, refusal_reason(first))
    for k, c in enumerate(members):
        if outcomes[k] is None:
            outcomes[k] = svc._submit(holder, c, now)
    return outcomes
