"""The internal planes of a real local Ray cluster started the way an
operator would without choosing a cluster token, with mutual TLS on the
worker RPC and KV planes and HTTPS on the OpenAI API: requests cross both
planes under TLS; no fixed string reaches a replica; a plaintext or
certificate-less client cannot connect, nor a plaintext HTTP client."""

from __future__ import annotations

import asyncio
import os
import ssl
import time

import grpc
import httpx
import pytest
import ray
from openai import OpenAI

from splitserve.cluster.cli.smoke import smoke_test
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app, secrets
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.stats import stats_from_wire
from splitserve.handoff.messages import GenerateRequest, PrefillRequest, PrefillTarget
from splitserve.handoff.rpc import RpcError, WorkerClient
from splitserve.handoff.tls import TLSConfig
from splitserve.handoff.transfer.base import KVLayout, TransportConfig
from splitserve.handoff.transfer.errors import PeerUnavailable, TransferAuthError
from splitserve.handoff.transfer.grpc_transport import GrpcKVSender
from tests.integration.pd_harness import make_engine
from tests.integration.ray_cluster import local_ray
from tests.integration.test_cluster_e2e import free_port
from tests.unit.tls_certs import CA

KEY = "sk-planes-test"
# strings a stranger would try: the old built-in token, empty, the project's name, defaults
FIXED = ["splitserve-dev", "", "splitserve", "default", "token", "changeme", "cluster-token"]
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints, tmp_path_factory):
    llama = tiny_checkpoints["llama"]
    folder = tmp_path_factory.mktemp("tls")
    ca = CA()
    replica = ca.issue("replica.splitserve.test", ips=("127.0.0.1",))
    cert, key = replica.write(folder, "replica")
    (folder / "ca.crt").write_bytes(ca.cert)
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    cfg = parse_config({
        "models": [{"model": {"name": "llama", "path": str(llama), "num_blocks": 128,
                              "block_size": 4}, "prefill": pool, "decode": pool}],
        "router": {"local_prefill_max_tokens": 0},  # every prompt crosses the KV plane
        "transfer": {"tls": {"cert": cert, "key": key, "ca": str(folder / "ca.crt"),
                             "mutual": True}},
        "auth": {"api_keys": [KEY]},  # and no cluster token
        "endpoints": {"http_port": free_port(), "grpc_port": free_port(),
                      "http_tls_cert": cert, "http_tls_key": key},
    })
    saved = os.environ.pop("SPLITSERVE_CLUSTER_TOKEN", None)
    try:
        assert cfg.cluster_token() is None
        with local_ray(num_cpus=4):
            app.deploy(cfg, wait_s=240)
            peer = TLSConfig(cert_chain=replica.cert, private_key=replica.key, root_certs=ca.cert)
            yield cfg, llama, peer, ca
    finally:
        if saved is not None:
            os.environ["SPLITSERVE_CLUSTER_TOKEN"] = saved


def _replicas() -> dict[str, list[dict]]:
    return ray.get(app.get_router().replicas.remote())["llama"]


def _decode_stats(peer: TLSConfig):
    """The decode replica's stats, asked with the cluster's token over TLS."""
    (decode,) = _replicas()["decode"]

    async def ask():
        c = WorkerClient(decode["replica_id"], secrets.cluster_token(), tls=peer)
        try:
            return stats_from_wire(await c.stats(timeout=10))
        finally:
            await c.close()

    return asyncio.run(ask())


def test_requests_cross_both_planes_under_tls(cluster):
    cfg, llama, peer, ca = cluster
    client = OpenAI(base_url=f"https://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0, http_client=httpx.Client(verify=_trusting(ca)))
    want = make_engine(llama, block_size=4).generate(
        ["the quick brown fox"], SamplingParams(max_tokens=8, temperature=0.0))[0]
    out = client.completions.create(model="llama", prompt="the quick brown fox", max_tokens=8,
                                    temperature=0)
    assert out.choices[0].text == want.text

    s = _decode_stats(peer)
    assert s.handoffs >= 1 and s.local_prefills == 0 and s.fallbacks == 0

    # the routers' streams are TLS too, and the ingress (exchanges, on every
    # heartbeat) and both replicas (stats pushes) reached every router over them
    def streams():
        return [ray.get(app.get_router(index=i).counters.remote())["stream"] for i in range(2)]

    deadline = time.monotonic() + 20
    while not all(s and s["exchange"] >= 1 and s["stats"] >= 2 for s in streams()):
        assert time.monotonic() < deadline, streams()
        time.sleep(0.5)
    assert all(s["tls"] for s in streams())


def _calls(address: str, token: str, tls: TLSConfig | None) -> list[Code]:
    """Stats, Prefill and Generate on one replica: the status code of each."""
    layout = KVLayout("llama", "float32", "float32", 4, 2, 1, 8)
    calls = [
        lambda c: c.stats(timeout=10),
        lambda c: c.prefill(PrefillRequest(
            request_id="x", prompt_token_ids=[1, 2], params={"max_tokens": 1},
            target=PrefillTarget(endpoint="grpc://127.0.0.1:1", skip_tokens=0, layout=layout)),
            timeout=10),
        lambda c: _drain(c.generate(GenerateRequest(
            request_id="x", prompt_token_ids=[1, 2], params={"max_tokens": 1}, prefill=None),
            timeout=10)),
    ]

    async def main():
        c = WorkerClient(address, token, tls=tls)
        codes = []
        try:
            for call in calls:
                try:
                    await call(c)
                    codes.append(Code.OK)
                except RpcError as e:
                    codes.append(e.code)
        finally:
            await c.close()
        return codes

    return asyncio.run(main())


async def _drain(stream):
    return [x async for x in stream]


def _kv_ping(endpoint: str, token: str, tls: TLSConfig | None):
    async def main():
        tx = GrpcKVSender(TransportConfig(token=token, tls=tls))
        try:
            return await tx.ping(endpoint, 10.0)
        finally:
            await tx.close()
    return asyncio.run(main())


def test_no_fixed_string_reaches_a_cluster_without_a_configured_token(cluster):
    _, _, peer, _ = cluster
    reps = _replicas()
    workers = [r["replica_id"] for r in reps["prefill"] + reps["decode"]]
    kv = _decode_stats(peer).kv_endpoint
    assert len(workers) == 2
    for token in FIXED:
        for address in workers:
            assert _calls(address, token, peer) == [Code.UNAUTHENTICATED] * 3, (token, address)
        if token:  # a KV sender refuses to start without a token at all
            with pytest.raises(TransferAuthError):
                _kv_ping(kv, token, peer)
    real = secrets.cluster_token()
    assert real not in FIXED and len(real) >= 32
    assert _calls(reps["prefill"][0]["replica_id"], real, peer)[0] == Code.OK
    assert _kv_ping(kv, real, peer).layout is not None


def _trusting(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=ca.cert.decode())
    return ctx


def test_the_http_api_serves_https_only_and_the_smoke_check_pins_its_certificate(cluster):
    cfg, _, _, ca = cluster
    port = cfg.endpoints.http_port
    ok = httpx.get(f"https://127.0.0.1:{port}/v1/models", verify=_trusting(ca),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and [m["id"] for m in ok.json()["data"]] == ["llama"]
    with pytest.raises(httpx.HTTPError):  # no plaintext answer on the TLS port
        httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
        httpx.get(f"https://127.0.0.1:{port}/v1/models")
    assert smoke_test(cfg)  # `splitserve serve --smoke`: https, the configured certificate pinned


def test_plaintext_and_certificate_less_clients_cannot_connect(cluster):
    _, _, peer, ca = cluster
    reps = _replicas()
    real = secrets.cluster_token()
    no_client_cert = TLSConfig(root_certs=ca.cert)
    for r in reps["prefill"] + reps["decode"]:
        assert _calls(r["replica_id"], real, None) == [Code.UNAVAILABLE] * 3
        assert _calls(r["replica_id"], real, no_client_cert) == [Code.UNAVAILABLE] * 3
    kv = _decode_stats(peer).kv_endpoint
    for tls in (None, no_client_cert):
        with pytest.raises(PeerUnavailable):
            _kv_ping(kv, real, tls)
