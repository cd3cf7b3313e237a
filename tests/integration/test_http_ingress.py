"""The OpenAI HTTP API served by the ingress replicas themselves
(``endpoints.http_server: ingress``) on a real local Ray cluster, over
HTTPS, with two ingress replicas and no Serve proxy: the official client's
streamed and whole completions equal the engine's; bad input gets OpenAI's
error shape; the probes and /metrics answer as through the proxy; a switch
back to Serve's proxy on the running cluster is refused; an ingress roll (an
API key added) under a steady load of streams loses none of them, the
replicas being replaced having drained theirs."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import httpx
import openai
import pytest
import ray
from openai import OpenAI

from splitserve.cluster.config import ConfigError, parse_config
from splitserve.cluster.serve import app
from splitserve.cluster.serve.http_proxy import proxy_running
from splitserve.cluster.serve.router_actor import get_router
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.ports import free_port
from tests.integration.pd_harness import make_engine
from tests.integration.ray_cluster import local_ray
from tests.unit.tls_certs import CA

pytestmark = pytest.mark.slow

KEY, NEW_KEY = "sk-http-ingress", "sk-http-ingress-rotated"
PROMPT = "the quick brown fox"
STREAM_TOKENS = 96
CLIENTS = 4
BODY_TIMEOUT_S = 1.0


def config(model: str, http_port: int, grpc_port: int, cert: str, key: str, keys: list[str],
           http_server: str = "ingress"):
    return parse_config({
        "models": [{"model": {"name": "tiny", "path": model, "num_blocks": 512,
                              "block_size": 4, "max_num_seqs": 16},
                    "mode": "colocated",
                    "decode": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}}],
        "router": {"routers": 1, "stats_period_s": 0.1},
        "auth": {"api_keys": keys, "cluster_token": "http-ingress-token"},
        "endpoints": {"http_port": http_port, "grpc_port": grpc_port, "ingress_replicas": 2,
                      "http_server": http_server, "http_tls_cert": cert, "http_tls_key": key,
                      "drain_s": 20.0, "body_timeout_s": BODY_TIMEOUT_S},
    })


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("https")
    ca = CA()
    cert, key = ca.issue("ingress.splitserve.test", ips=("127.0.0.1",)).write(folder, "ingress")
    (folder / "ca.crt").write_bytes(ca.cert)
    args = (str(tiny_llama), free_port(), free_port(), cert, key)
    with local_ray(num_cpus=4):
        app.deploy(config(*args, [KEY]), wait_s=240)
        yield args, str(folder / "ca.crt")


def client(cluster, key: str = KEY) -> OpenAI:
    (_, http_port, *_), ca = cluster
    return OpenAI(base_url=f"https://127.0.0.1:{http_port}/v1", api_key=key,
                  http_client=httpx.Client(verify=ca, timeout=60))


def reference(tiny_llama, max_tokens: int) -> str:
    return make_engine(tiny_llama, block_size=4).generate(
        [PROMPT], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))[0].text


def test_the_official_client_over_https_without_a_proxy(cluster, tiny_llama):
    assert proxy_running() is False
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_PROXY_ACTOR")]
    c = client(cluster)
    want = reference(tiny_llama, 12)
    whole = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert whole.choices[0].text == want and whole.usage.completion_tokens == 12
    streamed = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                    stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == want
    # the probes and /metrics are the same app's
    (_, http_port, *_), ca = cluster
    with httpx.Client(base_url=f"https://127.0.0.1:{http_port}", verify=ca, timeout=10) as h:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert h.get("/ready", headers=auth).json()["status"] == "ready"
        assert h.get("/health", headers=auth).status_code == 200
        assert "splitserve_" in h.get("/metrics", headers=auth).text
        r = h.get("/v1/models")  # no key
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param",
                                                                   "code"}


def test_bad_input_gets_openai_errors(cluster):
    c = client(cluster)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    (_, http_port, *_), ca = cluster
    r = httpx.post(f"https://127.0.0.1:{http_port}/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}",
                            "Content-Type": "application/json"}, verify=ca)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # a body that never arrives whole: 408 once endpoints.body_timeout_s has
    # passed (the operator's setting reaches the replica), the connection closed
    ctx = ssl.create_default_context(cafile=ca)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}"
            "\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", http_port), timeout=BODY_TIMEOUT_S + 10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            t0 = time.monotonic()
            sock.sendall(head.encode() + b'{"model": ')
            got = b""
            while chunk := sock.recv(65536):  # to EOF: the server closes it
                got += chunk
            took = time.monotonic() - t0
    status, _, body = got.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408"), got
    assert json.loads(body)["error"]["code"] == "request_timeout"
    # the deadline runs from the request reaching the app, a little after the
    # client sent its head; timers may fire a little early: a 0.1 s margin
    assert BODY_TIMEOUT_S - 0.1 <= took < BODY_TIMEOUT_S + 5
    # plaintext HTTP to the HTTPS port: no answer (the TLS handshake fails,
    # the connection is closed), and the replica serves the next client
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as plain:
        plain.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            answer = plain.recv(65536)
        except ConnectionResetError:  # closed with data unread: a reset
            answer = b""
        assert answer == b""
    assert client(cluster).models.list().data[0].id == "tiny"


def _decode_stats(token: str):
    """The decode replica's ``WorkerStats`` (asked over the worker RPC)."""
    import asyncio

    from splitserve.engine.stats import stats_from_wire
    from splitserve.handoff.rpc import WorkerClient

    (rep,) = ray.get(get_router().replicas.remote())["tiny"]["decode"]

    async def ask():
        c = WorkerClient(rep["replica_id"], token)
        try:
            return stats_from_wire(await c.call("Stats", {}, timeout=10))
        finally:
            await c.close()

    return asyncio.run(ask())


CUT_TOKENS = 240  # what a cut stream asks for: ~240 decode steps if it ran on


def test_clients_gone_mid_stream_leave_no_slot_or_kv_block(cluster):
    """Streams cut by their clients (connections closed after the first
    chunk) among short streams read to their end, over both replicas: the
    cut ones' requests are cancelled at the decode replica (far fewer engine
    steps than they asked tokens for), their KV blocks freed and their
    admission slots returned, as through Serve's proxy."""
    import asyncio

    (_, http_port, *_), ca = cluster

    async def one(c: httpx.AsyncClient, cut: bool) -> str:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": CUT_TOKENS if cut else 8,
                "temperature": 0, "stream": True, "ignore_eos": True}
        async with c.stream("POST", "/v1/completions", json=body,
                            headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if cut and line.startswith("data: "):
                    return "cut"  # leaving the block closes the connection mid-stream
            return "done"

    async def burst() -> list[str]:
        # a connection per stream: both replicas get some
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{http_port}", verify=ca,
                                     timeout=60, limits=httpx.Limits(
                                         max_keepalive_connections=0)) as c:
            return await asyncio.gather(*(one(c, i % 2 == 0) for i in range(20)))

    token = "http-ingress-token"
    steps = _decode_stats(token).engine.steps
    assert sorted(asyncio.run(burst())) == ["cut"] * 10 + ["done"] * 10
    deadline = time.monotonic() + 15
    while True:
        held = ray.get(get_router().counters.remote())["slots_by_holder"]
        s = _decode_stats(token)
        if not any(held.values()) and s.idle() and s.engine.free_blocks == s.engine.total_blocks:
            break
        assert time.monotonic() < deadline, (held, s)
        time.sleep(0.2)
    print(f"decode steps for the burst: {s.engine.steps - steps}")
    assert s.engine.steps - steps < CUT_TOKENS / 2, (steps, s.engine.steps)


def test_switching_to_the_proxy_on_the_running_cluster_is_refused(cluster):
    args, _ = cluster
    with pytest.raises(ConfigError, match="endpoints.http_server: 'ingress' -> 'proxy'"):
        app.deploy(config(*args, [KEY], http_server="proxy"), wait_s=60)
    assert proxy_running() is False
    assert client(cluster).models.list().data[0].id == "tiny"  # still served as it was


def _draining_with_streams() -> set[int]:
    """pids of ingress replicas holding admission slots at the router that
    have unregistered from the rollout (their ``__del__`` began: draining)."""
    from ray.experimental import internal_kv

    held = ray.get(get_router().counters.remote())["slots_by_holder"]
    registered = {int(k.decode().rsplit(":", 2)[1])
                  for k in internal_kv._internal_kv_list(b"ingress/replica/",
                                                         namespace="splitserve")}
    return {int(h.split(":")[1]) for h, n in held.items() if n} - registered


def test_an_ingress_roll_under_load_loses_no_stream(cluster, tiny_llama):
    args, _ = cluster
    want = reference(tiny_llama, STREAM_TOKENS)
    stop, lock = threading.Event(), threading.Lock()
    done: list[float] = []  # each stream's end (monotonic)
    failed: list[str] = []

    def load() -> None:
        c = client(cluster)
        while not stop.is_set():
            try:
                s = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=STREAM_TOKENS,
                                         temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
                text = "".join(ch.choices[0].text for ch in s if ch.choices)
                with lock:
                    (done.append(time.monotonic()) if text == want
                     else failed.append(f"text {text!r}"))
            except Exception as e:  # noqa: BLE001 - counted
                with lock:
                    failed.append(f"{type(e).__name__}: {e}")

    drained: set[int] = set()

    def watch() -> None:
        while not stop.is_set():
            drained.update(_draining_with_streams())
            time.sleep(0.1)

    threads = [threading.Thread(target=load) for _ in range(CLIENTS)] + [
        threading.Thread(target=watch)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(done) < CLIENTS:  # the load runs
            assert time.monotonic() < deadline and not failed, failed
            time.sleep(0.1)
        rolled_at = time.monotonic()
        app.deploy(config(*args, [KEY, NEW_KEY]), wait_s=120)  # new keys: the ingress rolls
        # until the replaced replicas have drained, and a little load after
        while _draining_with_streams() or len([d for d in done if d > rolled_at]) < 2 * CLIENTS:
            assert time.monotonic() < deadline + 120, (len(done), failed)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    print(f"{len(done)} streams finished ({len([d for d in done if d > rolled_at])} after the "
          f"roll began), replicas seen draining streams: {sorted(drained)}")
    assert not failed, failed
    assert drained, "no replaced replica held a stream while it drained: the roll proved nothing"
    # the rotated key works on the new replicas
    out = client(cluster, NEW_KEY).completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                                      temperature=0)
    assert out.usage.completion_tokens == 4
