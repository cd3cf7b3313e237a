"""The bytes an ``Exchange`` and its answers travel as between an ingress
and a router actor.

Ray pickles an actor call's arguments with cloudpickle, whose pure-Python
hook runs for every object: an exchange of 32 requests (each with some 80
block hashes) cost more to pickle and unpickle than the router spends
placing them. Here an ``Exchange`` (a msgspec struct, as are its
``RouteCall``s, ``RouteRequest``s and ``LeaseEnd``s) travels as msgpack in
positional form (``array_like``) and is decoded straight into those
structs; a message that does not match them fails to decode
(``msgspec.ValidationError``), it never becomes a default.

The reply's outcomes are ``Placement``s (a tagged struct), ``WireQueued``
for ``Queued``, and ``WireRefusal`` for a ``RouteRefusal``: its class
(``kind``) and the fields it is built from, rebuilt as the same exception
on the ingress. ``poll``'s answer travels as a ``WireResolved``.
"""

from __future__ import annotations

from typing import Union

import msgspec

from splitserve.router.exchange import QUEUED, Exchange, ExchangeReply, Outcome, Queued
from splitserve.router.types import (
    NeverFitsError,
    NoCapacityError,
    NoReplicaError,
    OverloadedError,
    Placement,
    QueueDelayError,
    QueueTimeoutError,
    RouteRefusal,
    UnknownModelError,
)


class WireQueued(msgspec.Struct, array_like=True, gc=False, frozen=True, tag="queued"):
    """``Queued``."""


class WireRefusal(msgspec.Struct, array_like=True, gc=False, frozen=True, tag="refusal"):
    """A ``RouteRefusal``: its class (``kind``) and the fields it is built from."""

    kind: str
    model: str
    message: str = ""
    retry_after_s: float = 0.0
    in_flight: int = 0
    limit: int = 0
    known: tuple[str, ...] = ()
    needed: int = 1


WireOutcome = Union[Placement, WireQueued, WireRefusal]


class WireReply(msgspec.Struct, array_like=True, gc=False, frozen=True):
    incarnation: str
    outcomes: tuple[WireOutcome, ...]


class WireResolved(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """What ``poll`` returns: (lease id, outcome) of each decided request."""

    resolved: tuple[tuple[str, Union[Placement, WireRefusal]], ...]


# the refusals that cross, by the name each travels under; subclasses first
_NO_CAPACITY_KINDS: dict[str, type[NoCapacityError]] = {
    "never_fits": NeverFitsError, "queue_timeout": QueueTimeoutError, "queue_delay": QueueDelayError,
    "no_replica": NoReplicaError, "no_capacity": NoCapacityError,
}

_ENCODER = msgspec.msgpack.Encoder()
_EXCHANGE = msgspec.msgpack.Decoder(Exchange)
_REPLY = msgspec.msgpack.Decoder(WireReply)
_RESOLVED = msgspec.msgpack.Decoder(WireResolved)


# -- ingress -> router ------------------------------------------------------------------
def encode_exchange(ex: Exchange) -> bytes:
    return _ENCODER.encode(ex)


def decode_exchange(data: bytes) -> Exchange:
    return _EXCHANGE.decode(data)


# -- router -> ingress ------------------------------------------------------------------
def encode_reply(reply: ExchangeReply) -> bytes:
    return _ENCODER.encode(WireReply(reply.incarnation,
                                     tuple(_wire_outcome(o) for o in reply.outcomes)))


def decode_reply(data: bytes) -> ExchangeReply:
    w = _REPLY.decode(data)
    return ExchangeReply(w.incarnation, tuple(_outcome(o) for o in w.outcomes))


def encode_resolved(resolved: list[tuple[str, Outcome]]) -> bytes:
    return _ENCODER.encode(WireResolved(tuple((lid, _wire_outcome(o)) for lid, o in resolved)))


def decode_resolved(data: bytes) -> list[tuple[str, Outcome]]:
    return [(lid, _outcome(o)) for lid, o in _RESOLVED.decode(data).resolved]


def _wire_outcome(out: Outcome | Queued) -> WireOutcome:
    if isinstance(out, Placement):
        return out
    if isinstance(out, Queued):
        return WireQueued()
    return _wire_refusal(out)


def _wire_refusal(err: RouteRefusal) -> WireRefusal:
    if isinstance(err, OverloadedError):
        return WireRefusal("overloaded", err.model, retry_after_s=err.retry_after_s,
                           in_flight=err.in_flight, limit=err.limit, needed=err.needed)
    if isinstance(err, UnknownModelError):
        return WireRefusal("unknown_model", err.model, known=err.known)
    for kind, cls in _NO_CAPACITY_KINDS.items():
        if isinstance(err, cls):
            return WireRefusal(kind, err.model, str(err), err.retry_after_s)
    raise TypeError(f"not a router refusal: {err!r}")


def _outcome(w: WireOutcome) -> Outcome | Queued:
    if isinstance(w, Placement):
        return w
    if isinstance(w, WireQueued):
        return QUEUED
    if w.kind == "overloaded":
        return OverloadedError(w.model, w.in_flight, w.limit, w.retry_after_s, w.needed)
    if w.kind == "unknown_model":
        return UnknownModelError(w.model, w.known)
    cls = _NO_CAPACITY_KINDS.get(w.kind)
    if cls is None:
        raise msgspec.ValidationError(f"unknown refusal kind {w.kind!r}")
    return cls(w.message, w.model, w.retry_after_s)
