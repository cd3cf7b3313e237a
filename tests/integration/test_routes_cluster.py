"""Routes on a real local Ray cluster: two served tiny models as the
variants of one route, through the HTTP ingress (official openai client).
The route splits traffic and names the variant; a hot edit of the weights
with ``deploy`` during streaming restarts nothing and loses nothing; a ramp
advances on the outcomes the ingress reports and survives a restart of the
route controller."""

import threading
import time

import openai
import pytest
import ray

from splitserve.cluster.api.routing import VARIANT_HEADER
from splitserve.cluster.cli.ops import collect_routes, format_routes
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.cluster.serve.route_actor import get_route_actor
from splitserve.cluster.serve.router_actor import get_router
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port

KEY = "sk-routes-test"
STREAM_TOKENS = 96


def config(ports, routes):
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    return parse_config({
        "models": [
            {"model": {"name": "v1", "path": str(ports["paths"]["llama"]), "num_blocks": 256,
                       "block_size": 4}, "mode": "colocated", "decode": pool},
            {"model": {"name": "v2", "path": str(ports["paths"]["qwen3"]), "num_blocks": 256,
                       "block_size": 4}, "mode": "colocated", "decode": pool},
        ],
        "routes": routes,
        "router": {"stats_period_s": 0.1, "stats_ttl_s": 5.0, "routers": 1},
        "auth": {"api_keys": [KEY], "cluster_token": "routes-test-token"},
        "endpoints": {"http_port": ports["http"], "grpc_port": ports["grpc"]},
    })


def split(w1, w2, **kw):
    return [{"name": "chat", "variants": [{"name": "v1", "weight": w1},
                                          {"name": "v2", "weight": w2}], **kw}]


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    ports = {"http": free_port(), "grpc": free_port(),
             "paths": {"llama": tiny_checkpoints["llama"], "qwen3": tiny_checkpoints["qwen3"]}}
    with local_ray(num_cpus=4):
        app.deploy(config(ports, split(100, 0)), wait_s=180)
        yield ports


def client(ports):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key=KEY,
                         max_retries=0, timeout=60)


def ask(ports, user=None, max_tokens=2):
    raw = client(ports).completions.with_raw_response.create(
        model="chat", prompt="the quick brown fox", max_tokens=max_tokens, temperature=0,
        **({"user": user} if user else {}))
    return raw.headers[VARIANT_HEADER], raw.parse()


def test_the_route_serves_its_variant_and_names_it(cluster):
    for u in ("a", "b", "c", "d"):
        variant, out = ask(cluster, u)
        assert variant == "v1" and out.model == "chat"
    assert "chat" in [m.id for m in client(cluster).models.list().data]


def stream_loop(ports, user, stop, results):
    """Streams one completion after another until ``stop``: (start, end,
    variant, completion tokens, finish_reason, error) each."""
    c = client(ports)
    while not stop.is_set():
        start = time.monotonic()
        variant, tokens, finish, error = None, 0, None, None
        try:
            with c.completions.with_streaming_response.create(
                    model="chat", prompt="once upon a time", max_tokens=STREAM_TOKENS,
                    temperature=0, stream=True, user=user,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True}) as raw:
                variant = raw.headers[VARIANT_HEADER]
                for chunk in raw.parse():
                    for ch in chunk.choices:
                        finish = ch.finish_reason or finish
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                    assert chunk.model == "chat"
        except Exception as e:  # noqa: BLE001 - reported below
            error = repr(e)
        results.append((start, time.monotonic(), variant, tokens, finish, error))


def test_a_hot_edit_during_streams_restarts_nothing_and_loses_nothing(cluster):
    routes = get_route_actor()
    holders = set(ray.get(routes.holders.remote()))
    replicas = {r["replica_id"] for m in ray.get(get_router().replicas.remote()).values()
                for pool in m.values() for r in pool}
    assert holders and replicas
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=stream_loop, args=(cluster, f"s{i}", stop, results))
               for i in range(2)]
    for t in threads:
        t.start()
    try:
        while len(results) < 2:  # the streams run
            time.sleep(0.05)
        summary = app.deploy(config(cluster, split(0, 100)), wait_s=120)
        done_at = time.monotonic()
        while not [r for r in results if r[0] > done_at]:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert summary["routes"] == ["route chat: changed"] and not summary["routes_pending"]
    assert all(r[5] is None for r in results), [r for r in results if r[5]]
    # every stream got all its tokens, on the variant it began with
    assert all(r[4] == "length" and r[3] == STREAM_TOKENS for r in results), results
    assert all(r[2] == "v2" for r in results if r[0] > done_at)
    first_v2 = min(r[0] for r in results if r[2] == "v2")
    # a v1 stream was running when the ingress switched, and finished on v1
    assert any(r[2] == "v1" and r[1] > first_v2 for r in results), results
    # nothing restarted: the same ingress process, the same pool replicas
    assert set(ray.get(routes.holders.remote())) == holders
    now = {r["replica_id"] for m in ray.get(get_router().replicas.remote()).values()
           for pool in m.values() for r in pool}
    assert now == replicas


def wait_for(pred, timeout_s=60.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_a_ramp_advances_on_reported_outcomes_and_survives_a_controller_restart(cluster):
    ramp = {"variant": "v2", "steps": [50, 100], "hold_s": 0, "min_requests": 3,
            "max_error_rate": 0.5}
    app.deploy(config(cluster, split(100, 0, ramp=ramp)), wait_s=120)
    route = collect_routes()[0]
    assert route["ramp"]["status"] == "ramping" and route["ramp"]["percent"] == 50.0
    for _ in range(16):  # keyless: drawn 50/50, each outcome reported to the controller
        assert ask(cluster)[0] in ("v1", "v2")

    def complete():
        r = collect_routes()[0]
        return r if r["ramp"]["status"] == "complete" else None

    route = wait_for(complete)
    assert [v["percent"] for v in route["variants"]] == [0.0, 100.0]
    move = route["ramp"]["last_move"]
    assert move["kind"] == "complete" and move["from_percent"] == 50 and "held" in move["reason"]
    text = format_routes([route], time.time())
    assert "chat: v1 0.0%, v2 100.0%" in text and "complete 50% -> 100%" in text
    wait_for(lambda: ask(cluster)[0] == "v2")  # the ingress follows within a period

    # the controller restarts: the ramp is where it was
    ray.kill(get_route_actor(), no_restart=False)
    again = wait_for(lambda: _routes_or_none())
    assert again[0]["ramp"]["status"] == "complete"
    assert again[0]["ramp"]["last_move"] == move
    assert all(ask(cluster, u)[0] == "v2" for u in ("x", "y"))


def _routes_or_none():
    try:
        return collect_routes()
    except ray.exceptions.RayActorError:
        return None
