"""The worker RPC plane refuses calls without the cluster token, on unary
and streaming methods alike, and accepts the right one."""

import asyncio

import grpc
import pytest

from splitserve.handoff import rpc
from splitserve.handoff.messages import GenerateOutput, GenerateRequest
from tests.unit.test_worker_rpc import fake_prefill, prefill_request, reply_for

TOKEN = "cluster-token-1"


async def _calls(token: str) -> tuple[object, object]:
    async def generate(req: GenerateRequest):
        for tok in req.prompt_token_ids:
            yield GenerateOutput(request_id=req.request_id, token_ids=[tok], text="",
                                 finished=False, finish_reason=None, prompt_tokens=2,
                                 completion_tokens=1, cached_tokens=0)

    server, addr = await rpc.serve({"Prefill": fake_prefill}, {"Generate": generate}, TOKEN)
    client = rpc.WorkerClient(addr, token)
    results = []
    gen = GenerateRequest(request_id="g", prompt_token_ids=[4, 5], params={}, prefill=None)
    try:
        for call in (lambda: client.prefill(prefill_request(), timeout=10),
                     lambda: _collect(client.generate(gen))):
            try:
                results.append(await call())
            except rpc.RpcError as e:
                results.append(e.code)
    finally:
        await client.close()
        await server.stop(None)
    return tuple(results)


async def _collect(stream) -> list[list[int]]:
    return [out.token_ids async for out in stream]


def test_the_cluster_token_is_accepted():
    assert asyncio.run(_calls(TOKEN)) == (reply_for(prefill_request()), [[4], [5]])


@pytest.mark.parametrize("token", ["", "wrong", "cluster-token-", "cluster-token-12",
                                   "splitserve-dev"])
def test_a_wrong_token_is_unauthenticated(token):
    assert asyncio.run(_calls(token)) == (grpc.StatusCode.UNAUTHENTICATED,) * 2
