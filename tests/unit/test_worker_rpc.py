"""The worker RPC plane on loopback: typed messages decoded strictly on both
sides, and every error raised on the client as the worker's own class under
its fixed status code."""

from __future__ import annotations

import asyncio

import grpc
import msgspec
import pytest

from splitserve.engine.errors import IncompatibleKVError, InvalidRequestError, OutOfBlocksError
from splitserve.handoff import rpc
from splitserve.handoff.messages import (ErrorKind, GenerateOutput, GenerateRequest,
                                         HandoffMeta, PrefillReply, PrefillRequest,
                                         PrefillTarget, PrefillTimings)
from splitserve.handoff.rpc_errors import RpcError
from splitserve.handoff.transfer import errors as terr
from splitserve.handoff.transfer.base import KVLayout

TOKEN = "t0ken"
LAYOUT = KVLayout("tiny", "float32", "float32", 4, 2, 1, 8)


def prefill_request(rid="r1") -> PrefillRequest:
    return PrefillRequest(request_id=rid, prompt_token_ids=[1, 2, 3], params={"max_tokens": 2},
                          target=PrefillTarget(endpoint="grpc://x:1", skip_tokens=0, layout=LAYOUT))


def reply_for(req: PrefillRequest) -> PrefillReply:
    meta = HandoffMeta(request_id=req.request_id, layout=LAYOUT,
                       prompt_token_ids=req.prompt_token_ids, first_token_id=7,
                       params=req.params, first_logprobs=None, prompt_logprobs=None)
    return PrefillReply(meta=meta, timings=PrefillTimings(prefill_s=0.1, prefill_queue_s=0.0,
                                                          transfer_wait_s=0.2, bytes=64))


# what the fake worker raises, keyed by request id
FAILURES = {
    "bad": InvalidRequestError("temperature must be <= 2", param="temperature"),
    "full": OutOfBlocksError("3 free blocks cannot hold 5"),
    "pair": IncompatibleKVError("block_size: 4 != 8"),
    "gone": terr.UnknownHandoffError("no live reservation for hand-off 'gone'"),
    "slow": terr.TransferTimeout("no ack within 0.3s"),
    "crc": terr.ChecksumMismatch("crc32 differs"),
    "bug": KeyError("oops"),
}
# exception class, status code and kind each is raised as on the client
EXPECTED = {
    "bad": (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT, ErrorKind.INVALID_REQUEST),
    "full": (OutOfBlocksError, grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorKind.OUT_OF_BLOCKS),
    "pair": (IncompatibleKVError, grpc.StatusCode.FAILED_PRECONDITION, ErrorKind.INCOMPATIBLE_KV),
    "gone": (terr.UnknownHandoffError, grpc.StatusCode.NOT_FOUND, ErrorKind.UNKNOWN_HANDOFF),
    "slow": (terr.TransferTimeout, grpc.StatusCode.DEADLINE_EXCEEDED, ErrorKind.TRANSFER_TIMEOUT),
    "crc": (terr.ChecksumMismatch, grpc.StatusCode.UNAVAILABLE, ErrorKind.CHECKSUM_MISMATCH),
    "bug": (RpcError, grpc.StatusCode.INTERNAL, ErrorKind.INTERNAL),
}


async def fake_prefill(req: PrefillRequest) -> PrefillReply:
    assert isinstance(req, PrefillRequest)
    if req.request_id in FAILURES:
        raise FAILURES[req.request_id]
    if req.request_id == "cached":  # its prefix cache held 2 blocks of 4
        reply = reply_for(req)
        reply.cached_tokens = 8
        return reply
    return reply_for(req)


async def fake_generate(req: GenerateRequest):
    for i, tok in enumerate(req.prompt_token_ids):
        yield GenerateOutput(request_id=req.request_id, token_ids=[tok], text="",
                             finished=i == len(req.prompt_token_ids) - 1, finish_reason=None,
                             prompt_tokens=3, completion_tokens=i + 1, cached_tokens=0)
    raise OutOfBlocksError("mid-stream")


async def fake_stats(_req) -> dict:
    return {"running": 0}


def run_with_server(body):
    async def main():
        server, addr = await rpc.serve({"Prefill": fake_prefill, "Stats": fake_stats},
                                       {"Generate": fake_generate}, TOKEN)
        client = rpc.WorkerClient(addr, TOKEN)
        try:
            return await body(client, addr)
        finally:
            await client.close()
            await server.stop(0)
    return asyncio.run(main())


def test_typed_round_trip():
    async def body(client, _addr):
        reply = await client.prefill(prefill_request())
        assert reply == reply_for(prefill_request())
        assert await client.stats() == {"running": 0}
    run_with_server(body)


def test_prefill_reply_cached_tokens_is_optional_on_the_wire():
    """A reply of a prefill replica that does not report its cached tokens
    decodes (as 0); a reply reporting none leaves the key out, so a decoder
    without the field reads it too; a count below 0 is refused."""
    dec = msgspec.msgpack.Decoder(PrefillReply)
    old = msgspec.to_builtins(reply_for(prefill_request()))
    assert "cached_tokens" not in old
    assert dec.decode(msgspec.msgpack.encode(old)).cached_tokens == 0
    hit = PrefillReply(meta=reply_for(prefill_request()).meta,
                       timings=reply_for(prefill_request()).timings, cached_tokens=8)
    assert dec.decode(msgspec.msgpack.encode(hit)) == hit
    with pytest.raises(msgspec.ValidationError, match="cached_tokens"):
        dec.decode(msgspec.msgpack.encode({**old, "cached_tokens": -4}))

    async def body(client, _addr):  # through the RPC plane, as sent
        reply = await client.prefill(prefill_request("cached"))
        assert reply.cached_tokens == 8
    run_with_server(body)


@pytest.mark.parametrize("rid", sorted(FAILURES))
def test_errors_cross_as_the_workers_class_and_code(rid):
    cls, code, kind = EXPECTED[rid]

    async def body(client, _addr):
        with pytest.raises(cls) as info:
            await client.prefill(prefill_request(rid))
        e = info.value
        assert isinstance(e, RpcError)
        assert (e.code, e.kind) == (code, kind)
        assert e.message == (str(FAILURES[rid]) if rid != "bad" else "temperature must be <= 2")
        assert e.param == ("temperature" if rid == "bad" else None)
    run_with_server(body)


def test_an_error_passed_on_keeps_its_kind_and_code():
    # a decode worker failing its Generate with the prefill replica's error
    async def body(client, addr):
        with pytest.raises(OutOfBlocksError) as first:
            await client.prefill(prefill_request("full"))

        async def forward(_req):
            raise first.value
        server, addr2 = await rpc.serve({"Prefill": forward}, {}, TOKEN)
        c2 = rpc.WorkerClient(addr2, TOKEN)
        try:
            with pytest.raises(OutOfBlocksError) as again:
                await c2.prefill(prefill_request())
        finally:
            await c2.close()
            await server.stop(0)
        assert again.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert again.value.message == "3 free blocks cannot hold 5"
    run_with_server(body)


def test_stream_error_after_outputs():
    async def body(client, _addr):
        got = []
        with pytest.raises(OutOfBlocksError):
            async for out in client.generate(GenerateRequest(
                    request_id="g", prompt_token_ids=[4, 5], params={}, prefill=None)):
                got.append(out)
        assert [o.token_ids for o in got] == [[4], [5]]
        assert all(isinstance(o, GenerateOutput) for o in got)
    run_with_server(body)


def test_malformed_bodies_fail_loudly_on_both_sides():
    good = msgspec.to_builtins(prefill_request())

    async def body(client, addr):
        # the client converts a dict strictly: a typo is not a default
        with pytest.raises(msgspec.ValidationError, match="skip_tokens"):
            await client.call("Prefill", {**good, "target": {**good["target"], "skip_tokens": "0"}})
        with pytest.raises(msgspec.ValidationError, match="unknown field `transfer_timeout_s`"):
            await client.call("Prefill", {**good, "transfer_timeout_s": 1.0})
        # the server decodes strictly what arrives on the wire
        channel = grpc.aio.insecure_channel(addr)
        try:
            call = channel.unary_unary(f"/{rpc.SERVICE}/Prefill")
            for raw in (msgspec.msgpack.encode({k: v for k, v in good.items() if k != "target"}),
                        msgspec.msgpack.encode({**good, "extra": 1})):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(raw, metadata=((rpc.TOKEN_KEY, TOKEN),))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "malformed Prefill request" in info.value.details()
        finally:
            await channel.close()
    run_with_server(body)


def test_wrong_token_is_refused_as_unauthenticated():
    async def body(_client, addr):
        c = rpc.WorkerClient(addr, "wrong")
        try:
            with pytest.raises(RpcError) as info:
                await c.prefill(prefill_request())
        finally:
            await c.close()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.kind is ErrorKind.UNAUTHENTICATED
    run_with_server(body)


def test_unknown_methods_are_refused_at_serve():
    async def main():
        with pytest.raises(ValueError, match="unknown worker method"):
            await rpc.serve({"Prefil": fake_prefill}, {}, TOKEN)
        with pytest.raises(ValueError, match="streaming"):
            await rpc.serve({"Generate": fake_generate}, {}, TOKEN)
    asyncio.run(main())
