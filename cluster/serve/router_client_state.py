"""What ``RouterClient`` keeps per call and per router, in one ingress process.

``PendingCall``: one ``place`` waiting for its outcome (and, for a request's
choices, staged by ``choice_staging.ChoiceStaging``); ``LinkState``: what is
due for one router (calls, releases, suspects, queued requests) beside its
transport (``router_link.RouterLink``). Only ``RouterClient``, its
``ChoiceStaging`` and its ``RouterQueries`` (through ``link_actor``) use them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from splitserve.cluster.serve.router_link import RouterLink
from splitserve.router.exchange import LeaseEnd, Outcome, RouteCall


@dataclass(eq=False)
class PendingCall:
    call: RouteCall
    future: asyncio.Future
    link: int = -1
    sent: bool = False
    dropped: bool = False  # released before it was sent
    group: str | None = None  # a request's choices: sent and admitted together


@dataclass(eq=False)
class LinkState:
    """What is due for one router, and its transport (``router``)."""

    index: int
    router: RouterLink
    up: bool = True
    retry_at: float = 0.0  # monotonic: next probe of a down link
    incarnation: str = ""
    calls: list[PendingCall] = field(default_factory=list)
    releases: list[LeaseEnd] = field(default_factory=list)
    suspects: list[str] = field(default_factory=list)
    queued: dict[str, PendingCall] = field(default_factory=dict)
    # outcomes a poll brought before the exchange reply that queued them
    early: dict[str, Outcome] = field(default_factory=dict)
    last_live: float = float("-inf")  # monotonic: last time the live list was sent
    wake: asyncio.Event | None = None
    settled: asyncio.Event | None = None  # an exchange came back
    inflight: int = 0
    task: asyncio.Task | None = None
    poller: asyncio.Task | None = None


async def link_actor(link: LinkState) -> Any:
    """``RouterQueries``' way to a link's actor handle."""
    return await link.router.actor()
