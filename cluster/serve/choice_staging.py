"""The ingress' grouping of one request's choices (n > 1) before they travel.

``RouterClient`` holds one ``ChoiceStaging``: a choice that asks for a slot
with ``place``'s ``group`` waits here until every choice of its request has
asked, released or withdrawn, then the group's calls go to the router
together (``RouterClient._send``), in one exchange whose ``Exchange.groups``
(``exchange_groups``) lets the router admit them all or refuse them all.
"""

from __future__ import annotations

from typing import Callable

from splitserve.cluster.serve.router_client_state import PendingCall


class ChoiceStaging:
    def __init__(self, send: Callable[[PendingCall], None]):
        """``send``: hands a call to its router's link (``RouterClient._send``)."""
        self._send = send
        # groups whose choices have not all asked yet: key -> [choices still to come, calls]
        self._staged: dict[str, list] = {}

    def stage(self, p: PendingCall, key: str, size: int) -> None:
        """``p`` is a choice of group ``key`` of ``size`` choices: it waits
        until its group is complete, or is sent now with it."""
        p.group = key
        # [choices still expected, calls staged]; a key seen first here
        staged = self._staged.setdefault(key, [size, []])
        staged[1].append(p)
        self._flush(key)

    def holds(self, p: PendingCall) -> bool:
        """``p`` waits here for its siblings (not sent yet)."""
        return p.group in self._staged and p in self._staged[p.group][1]

    def unstage(self, p: PendingCall) -> None:
        """A choice released or cancelled before its group was sent: it is
        not sent, and the group is one smaller."""
        staged = self._staged[p.group]
        staged[0] -= 1
        staged[1].remove(p)
        p.dropped = True
        self._flush(p.group)

    def withdraw(self, group: tuple[str, int]) -> None:
        """A choice of ``group`` (``place``'s) ended before it asked: its
        siblings do not wait for it."""
        staged = self._staged.get(group[0])
        if staged is None:  # the first of its group to end: the others will ask
            staged = self._staged[group[0]] = [group[1], []]
        staged[0] -= 1
        self._flush(group[0])  # sends the rest, or forgets a group none is due of

    def clear(self) -> None:
        self._staged.clear()

    def _flush(self, key: str) -> None:
        """Send a group's calls, together, once every choice still due
        asked; forget a group none of whose choices is due any more. A group
        whose staged calls all left while siblings are still due stays (with
        the smaller count): a sibling asking later is sent when the rest
        asked, not held for a full group that never forms."""
        size, calls = self._staged[key]
        if calls and len(calls) >= size:
            del self._staged[key]
            for p in calls:
                self._send(p)
        elif not calls and size <= 0:
            del self._staged[key]


def exchange_groups(calls: list[PendingCall]) -> tuple[tuple[int, ...], ...]:
    """``Exchange.groups`` of a batch: the indexes of each request's
    choices that ask for a slot for the first time."""
    groups: dict[str, list[int]] | None = None
    for i, p in enumerate(calls):
        if p.group is not None and not p.call.admitted:
            if groups is None:
                groups = {}
            groups.setdefault(p.group, []).append(i)
    if groups is None:
        return ()
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)
