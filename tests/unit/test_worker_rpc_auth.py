"""The worker RPC plane refuses calls without the cluster token."""

import asyncio

import grpc
import pytest

from splitserve.handoff import rpc

TOKEN = "cluster-token-1"


async def _echo(req: dict) -> dict:
    return {"echo": req["x"]}


async def _count(req: dict):
    for i in range(req["n"]):
        yield {"i": i}


async def _calls(token: str) -> tuple[object, object]:
    server, addr = await rpc.serve({"Echo": _echo}, {"Count": _count}, TOKEN)
    client = rpc.WorkerClient(addr, token)
    results = []
    try:
        for call in (lambda: client.call("Echo", {"x": 7}, timeout=10),
                     lambda: _collect(client.stream("Count", {"n": 3}, timeout=10))):
            try:
                results.append(await call())
            except rpc.RpcError as e:
                results.append(e.code)
    finally:
        await client.close()
        await server.stop(None)
    return tuple(results)


async def _collect(stream) -> list[dict]:
    return [item async for item in stream]


def test_the_cluster_token_is_accepted():
    assert asyncio.run(_calls(TOKEN)) == ({"echo": 7}, [{"i": 0}, {"i": 1}, {"i": 2}])


@pytest.mark.parametrize("token", ["", "wrong", "cluster-token-", "cluster-token-12"])
def test_a_wrong_token_is_unauthenticated(token):
    assert asyncio.run(_calls(token)) == (grpc.StatusCode.UNAUTHENTICATED,) * 2
