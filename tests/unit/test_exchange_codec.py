"""The exchange's wire form (``router/exchange_codec.py``): every field
and every outcome survives the trip, refusals come back as the same
exception class, a malformed message fails to decode, and the router
actor answers bytes with bytes."""

import asyncio
import time

import msgspec
import pytest

from splitserve.router import exchange_codec as codec
from splitserve.router.exchange import QUEUED, Exchange, ExchangeReply, LeaseEnd, RouteCall
from splitserve.router.types import (
    NeverFitsError,
    NoCapacityError,
    NoReplicaError,
    OverloadedError,
    Placement,
    QueueDelayError,
    QueueTimeoutError,
    RouteRequest,
    UnknownModelError,
)
from tests.unit.test_router_actor import Router, decode, prefill, router_cfg

HASHES = (0, 1, 2**63, 2**64 - 1, 12345678901234567890)


def test_an_exchange_round_trips_with_every_field():
    req = RouteRequest("r1", "m", 40, 8, prompt_token_ids=(), block_hashes=HASHES,
                       exclude_replicas=frozenset({"d1", "d0"}), expected_output_tokens=5,
                       adapter="lora-digest")
    calls = (RouteCall("l1", req, 1.5, 2.5, deadline=9.0, priority=-3, admitted=True,
                       traceparent="00-ab-cd-01", resumed=True),
             RouteCall("l2", RouteRequest("r2", "m", 3, 1, prompt_token_ids=(5, 6, 7)), 1.0, 1.0))
    ex = Exchange("node:1:abc", "inc", calls, (LeaseEnd("l0", 17), LeaseEnd("lx", -1, True)),
                  ("d9",), {"l1": "m", "l2": "m"})
    back = codec.decode_exchange(codec.encode_exchange(ex))
    assert back == ex
    assert back.calls[0].request.block_hashes == HASHES
    assert back.calls[0].request.exclude_replicas == frozenset({"d0", "d1"})
    assert codec.decode_exchange(codec.encode_exchange(Exchange("h"))) == Exchange("h")


@pytest.mark.parametrize("err", [
    OverloadedError("m", 7, 7, 1.25),
    UnknownModelError("x", ("m", "n")),
    NoCapacityError("no room", "m", 2.0),
    NeverFitsError("can never fit", "m", 1.0),
    QueueDelayError("would wait", "m", 3.0),
    QueueTimeoutError("waited", "m", 4.0),
    NoReplicaError("no replica", "m", 5.0),
])
def test_each_refusal_comes_back_as_itself(err):
    reply = ExchangeReply("inc", (Placement(None, "d0", "least_loaded", 0.5, 32), QUEUED, err))
    back = codec.decode_reply(codec.encode_reply(reply))
    assert back.incarnation == "inc" and back.outcomes[:2] == reply.outcomes[:2]
    got = back.outcomes[2]
    assert type(got) is type(err) and str(got) == str(err)
    assert got.__reduce__()[1] == err.__reduce__()[1]  # the same fields
    [(lid, again)] = codec.decode_resolved(codec.encode_resolved([("l1", err)]))
    assert lid == "l1" and type(again) is type(err) and str(again) == str(err)


def test_a_malformed_message_fails_to_decode():
    wire = msgspec.msgpack.encode(["holder", "seen", [["l1", ["r1", "m", 4]]], [], [], None])
    with pytest.raises(msgspec.ValidationError):
        codec.decode_exchange(wire)  # a RouteCall without its fields
    with pytest.raises(msgspec.ValidationError):
        codec.decode_reply(msgspec.msgpack.encode(["inc", [["refusal", "no_such_kind", "m"]]]))
    with pytest.raises(msgspec.ValidationError):  # an invalid request is refused on decode too
        bad = msgspec.msgpack.encode(["r", "m", 0, 8, [], [], [], None, None])
        msgspec.msgpack.decode(bad, type=RouteRequest)


def test_the_router_actor_answers_bytes_with_bytes():
    r = Router(router_cfg())
    r.update_stats(prefill())
    r.update_stats(decode())
    now = time.time()
    ex = Exchange("ingress", r.service.incarnation,
                  (RouteCall("a", RouteRequest("a", "m", 32, 8, block_hashes=()), now, now),))
    data = asyncio.run(r.exchange(codec.encode_exchange(ex)))
    assert isinstance(data, bytes)
    [out] = codec.decode_reply(data).outcomes
    assert isinstance(out, Placement) and out.decode_replica == "d0"
    assert asyncio.run(r.poll("ingress", 0.0, True)) == codec.encode_resolved([])
