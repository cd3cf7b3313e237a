"""The worker RPC plane's gate, against a real server on loopback in its own
process: the cluster token is checked before a call's body is read, each
request is bounded in bytes before it is decoded and in its lists, maps and
strings while it is decoded; after every refusal the server keeps serving,
with flat memory. Then TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os

import grpc
import msgspec
import pytest

from splitserve.handoff import messages as msg
from splitserve.handoff import rpc
from splitserve.handoff.messages import (GenerateOutput, GenerateRequest, PrefillReply,
                                         PrefillRequest, PrefillTarget)
from splitserve.handoff.rpc_errors import RpcError
from splitserve.handoff.tls import TLSConfig
from splitserve.handoff.transfer.base import KVLayout
from tests.unit.tls_certs import CA

pytestmark = pytest.mark.timeout(120)
TOKEN = "cluster-token-1"
LAYOUT = KVLayout("tiny", "float32", "float32", 4, 2, 1, 8)
Code = grpc.StatusCode


def generate_request(**kw) -> GenerateRequest:
    return GenerateRequest(**{"request_id": "g1", "prompt_token_ids": [1, 2, 3],
                              "params": {"max_tokens": 2}, "prefill": None, **kw})


def prefill_request() -> PrefillRequest:
    return PrefillRequest(request_id="p1", prompt_token_ids=[1, 2, 3], params={"max_tokens": 2},
                          target=PrefillTarget(endpoint="grpc://x:1", skip_tokens=0,
                                               layout=LAYOUT))


# -- the server, in its own process -------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _serve_forever(addr_q, stop, tls: TLSConfig | None = None) -> None:
    decoded = {name: 0 for name in msg.METHODS}

    def counting(name, decode):
        def run(raw):
            decoded[name] += 1
            return decode(raw)
        return run

    for name, decode in list(rpc._REQUESTS.items()):
        rpc._REQUESTS[name] = counting(name, decode)

    async def prefill(req: PrefillRequest) -> PrefillReply:
        raise AssertionError("no test call gets this far")

    async def generate(req: GenerateRequest):
        yield GenerateOutput(request_id=req.request_id, token_ids=req.prompt_token_ids, text="",
                             finished=True, finish_reason=None, prompt_tokens=3,
                             completion_tokens=1, cached_tokens=0)

    async def stats(_req) -> dict:
        return {"rss": _rss_bytes(), "decoded": dict(decoded)}

    async def main():
        server, addr = await rpc.serve({"Prefill": prefill, "Stats": stats},
                                       {"Generate": generate}, TOKEN, tls=tls)
        addr_q.put(addr)
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.stop(0)

    asyncio.run(main())


@pytest.fixture(scope="module")
def server():
    ctx = mp.get_context("spawn")
    addr_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve_forever, args=(addr_q, stop), daemon=True)
    proc.start()
    try:
        yield addr_q.get(timeout=60)
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def _raw_call(addr: str, method: str, body: bytes, token: str | None = TOKEN):
    """One call with a hand-made body, as any gRPC client could send it:
    ``(status code, reply)``, where the reply is the raw bytes (unary) or
    the list of raw replies (Generate)."""
    md = [] if token is None else [(rpc.TOKEN_KEY, token)]
    opts = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(addr, options=opts) as ch:
        path = f"/{rpc.SERVICE}/{method}"
        try:
            if method == "Generate":
                return Code.OK, list(ch.unary_stream(path)(body, metadata=md, timeout=30))
            return Code.OK, ch.unary_unary(path)(body, metadata=md, timeout=30)
        except grpc.RpcError as e:
            return e.code(), None


def _stats(addr: str) -> dict:
    code, raw = _raw_call(addr, "Stats", msgspec.msgpack.encode({}))
    assert code == Code.OK
    return msgspec.msgpack.decode(raw)


_enc = msgspec.msgpack.encode
_good = msgspec.to_builtins(generate_request())
# the issue's finding: 7.6 MiB of empty maps, where the plane took any map
EMPTY_MAPS = _enc({**_good, "params": {"stop": [{}] * 7_600_000}})

# (method, body, what a caller with the token gets)
BAD = {
    "empty maps in a parameter": ("Generate", EMPTY_MAPS, Code.INVALID_ARGUMENT),
    "a body of empty maps": ("Generate", _enc([{}] * 7_600_000), Code.INVALID_ARGUMENT),
    "too many prompt tokens": (
        "Generate", _enc({**_good, "prompt_token_ids": [1] * (msg.MAX_PROMPT_TOKENS + 1)}),
        Code.INVALID_ARGUMENT),
    "a negative token id": ("Generate", _enc({**_good, "prompt_token_ids": [-1]}),
                            Code.INVALID_ARGUMENT),
    "too many items in a parameter": (
        "Generate", _enc({**_good, "params": {"stop_token_ids": [1] * (msg.MAX_PARAM_ITEMS + 1)}}),
        Code.INVALID_ARGUMENT),
    "too many parameters": (
        "Generate", _enc({**_good, "params": {f"p{i}": 0 for i in range(msg.MAX_PARAMS + 1)}}),
        Code.INVALID_ARGUMENT),
    "nested lists in a parameter": ("Generate", _enc({**_good, "params": {"stop": [[[1]]]}}),
                                    Code.INVALID_ARGUMENT),
    "a request id past its bound": (
        "Generate", _enc({**_good, "request_id": "r" * (msg.MAX_ID_CHARS + 1)}),
        Code.INVALID_ARGUMENT),
    "not msgpack": ("Prefill", os.urandom(1 << 20), Code.INVALID_ARGUMENT),
    "a Stats request past its bound": ("Stats", _enc({"x": "y" * msg.MAX_CONTROL_BYTES}),
                                       Code.RESOURCE_EXHAUSTED),
    "a Prefill past its bound": ("Prefill", b"\0" * (msg.MAX_PROMPT_BYTES + 1),
                                 Code.RESOURCE_EXHAUSTED),
    "past every method's bound": ("Generate", b"\0" * (msg.MAX_PROMPT_BYTES + (1 << 20)),
                                  Code.RESOURCE_EXHAUSTED),
}


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN[:-1], TOKEN + "2", "splitserve-dev"])
def test_without_the_token_nothing_is_decoded(server, token):
    before = _stats(server)["decoded"]
    good = {"Prefill": _enc(prefill_request()), "Generate": _enc(generate_request()),
            "Stats": _enc({})}
    for method, body in good.items():
        assert _raw_call(server, method, body, token)[0] == Code.UNAUTHENTICATED
    for method, body, _ in BAD.values():
        assert _raw_call(server, method, body, token)[0] == Code.UNAUTHENTICATED
    after = _stats(server)["decoded"]
    assert after == {**before, "Stats": before["Stats"] + 1}  # only the Stats call above


def test_oversized_and_malformed_requests_are_refused_and_memory_stays_flat(server):
    for method, body, code in BAD.values():  # once first: gRPC's buffers, the allocator's pools
        assert _raw_call(server, method, body)[0] == code
    rss0 = _stats(server)["rss"]
    for _ in range(3):
        for name, (method, body, code) in BAD.items():
            assert _raw_call(server, method, body)[0] == code, name
    grown = _stats(server)["rss"] - rss0
    # accepting any map, the first payload alone grew a replica by 557 MiB
    assert grown < 48 << 20, f"the server grew by {grown >> 20} MiB"
    code, replies = _raw_call(server, "Generate", _enc(_good))
    assert code == Code.OK
    assert msgspec.msgpack.decode(replies[0], type=GenerateOutput).token_ids == [1, 2, 3]


def test_a_typed_client_bounds_what_it_sends(server):
    async def main():
        c = rpc.WorkerClient(server, TOKEN)
        try:
            with pytest.raises(msgspec.ValidationError, match="length <= 4096"):
                await c.call("Generate", {**_good, "params": {"stop_token_ids": [1] * 4097}})
            outs = [o async for o in c.generate(generate_request(), timeout=10)]
            assert outs[0].token_ids == [1, 2, 3]
        finally:
            await c.close()
    asyncio.run(main())


def test_an_empty_token_cannot_serve():
    with pytest.raises(ValueError, match="cluster token"):
        asyncio.run(rpc.serve({}, {}, ""))


# -- TLS --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki():
    ca = CA()
    return ca, ca.issue("replica.splitserve.test", ips=("127.0.0.1",)), CA().issue("stranger")


def _tls_round(server_tls: TLSConfig, client_tls: TLSConfig | None, token: str = TOKEN):
    """The Stats and Generate calls of one client against one TLS server:
    the status code of each."""
    async def stats(_req) -> dict:
        return {"ok": True}

    async def generate(req):
        yield GenerateOutput(request_id=req.request_id, token_ids=[5], text="x", finished=True,
                             finish_reason=None, prompt_tokens=3, completion_tokens=1,
                             cached_tokens=0)

    async def main():
        server, addr = await rpc.serve({"Stats": stats}, {"Generate": generate}, TOKEN,
                                       tls=server_tls)
        c = rpc.WorkerClient(addr, token, tls=client_tls)
        codes = []
        try:
            for call in (lambda: c.stats(timeout=5),
                         lambda: _collect(c.generate(generate_request(), timeout=5))):
                try:
                    await call()
                    codes.append(Code.OK)
                except RpcError as e:
                    codes.append(e.code)
        finally:
            await c.close()
            await server.stop(0)
        return codes
    return asyncio.run(main())


async def _collect(stream):
    return [x async for x in stream]


def test_tls_serves_tls_clients_and_refuses_plaintext(pki):
    ca, replica, _ = pki
    served = TLSConfig(cert_chain=replica.cert, private_key=replica.key, root_certs=ca.cert)
    assert _tls_round(served, TLSConfig(root_certs=ca.cert)) == [Code.OK] * 2
    assert _tls_round(served, None) == [Code.UNAVAILABLE] * 2
    assert _tls_round(served, TLSConfig(root_certs=ca.cert), token="wrong") == \
        [Code.UNAUTHENTICATED] * 2
    # a certificate signed by another CA is not trusted
    assert _tls_round(served, TLSConfig(root_certs=CA().cert)) == [Code.UNAVAILABLE] * 2
    # dialed by IP, the certificate must name it, or the client names what to expect
    dns_only = ca.issue("replicas.splitserve.test")
    by_name = TLSConfig(cert_chain=dns_only.cert, private_key=dns_only.key)
    assert _tls_round(by_name, TLSConfig(root_certs=ca.cert)) == [Code.UNAVAILABLE] * 2
    assert _tls_round(by_name, TLSConfig(root_certs=ca.cert,
                                         server_name="replicas.splitserve.test")) == [Code.OK] * 2


def test_mutual_tls_needs_a_client_certificate_from_the_ca(pki):
    ca, replica, stranger = pki
    mutual = TLSConfig(cert_chain=replica.cert, private_key=replica.key, root_certs=ca.cert,
                       require_client_cert=True)
    peer = TLSConfig(cert_chain=replica.cert, private_key=replica.key, root_certs=ca.cert)
    assert _tls_round(mutual, peer) == [Code.OK] * 2
    assert _tls_round(mutual, TLSConfig(root_certs=ca.cert)) == [Code.UNAVAILABLE] * 2
    outsider = TLSConfig(cert_chain=stranger.cert, private_key=stranger.key, root_certs=ca.cert)
    assert _tls_round(mutual, outsider) == [Code.UNAVAILABLE] * 2


def test_tls_config_is_checked():
    with pytest.raises(ValueError, match="go together"):
        TLSConfig(cert_chain=b"x")
    with pytest.raises(ValueError, match="root_certs"):
        TLSConfig(cert_chain=b"x", private_key=b"y", require_client_cert=True)
