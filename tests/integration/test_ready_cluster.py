"""Readiness on a real local Ray cluster: /ready (and gRPC health) answer 503
/ NOT_SERVING while the ingress runs without pools, 200 / SERVING once every
pool has a live replica, and still 200 / SERVING, naming the pool as
degraded, when the prefill pool loses its last replica (decode replicas then
prefill); /health stays 200 throughout."""

import argparse
import threading
import time

import grpc
import httpx
import pytest
import ray
import yaml
from openai import OpenAI
from ray import serve

from splitserve.cluster.api.proto import health_pb2, health_pb2_grpc
from splitserve.cluster.cli import ops as cli_ops
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app, secrets
from splitserve.cluster.serve.ingress import ingress_app
from splitserve.cluster.serve.router_actor import get_router
from splitserve.engine.roles import Role
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port

KEY = "sk-ready-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def wait_for(fn, want, timeout=120.0):
    """Poll ``fn()`` until it returns ``want``; the last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = fn()
        except (httpx.HTTPError, grpc.RpcError) as e:
            got = e
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cfg(tiny_llama):
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5, "graceful_shutdown_timeout_s": 5}
    return parse_config({
        "models": [{"model": {"name": "tiny", "path": str(tiny_llama), "num_blocks": 64,
                              "block_size": 4}, "prefill": pool, "decode": pool}],
        "router": {"stats_period_s": 0.1, "stats_ttl_s": 2.0},
        "auth": {"api_keys": [KEY], "cluster_token": "ready-test-token"},
        "endpoints": {"http_port": free_port(), "grpc_port": free_port()},
        "observability": {"unauthenticated_routes": ["health"]},
    })


def test_ready_follows_the_pools(cfg, tmp_path, capsys):
    url = f"http://127.0.0.1:{cfg.endpoints.http_port}"

    def ready():
        r = httpx.get(f"{url}/ready", timeout=10)  # no key: probes are open in this config
        return r.status_code, r.json().get("missing")

    with local_ray(num_cpus=4):
        # the router and the ingress, no pool yet
        version = secrets.publish(cfg)
        get_router(create_with=app.router_config(cfg))
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.endpoints.http_port})
        serve.run(ingress_app(cfg, version), name="ingress", route_prefix="/", blocking=False)
        # decode is what requests need (the empty prefill pool is only degraded)
        decode = [{"model": "tiny", "pool": "decode"}]
        assert wait_for(ready, (503, decode), timeout=180) == (503, decode)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401  # the rest needs a key
        channel = grpc.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)

        def grpc_status():
            return health.Check(health_pb2.HealthCheckRequest(), timeout=10).status

        assert wait_for(grpc_status, health_pb2.HealthCheckResponse.NOT_SERVING) == \
            health_pb2.HealthCheckResponse.NOT_SERVING

        # the pools come up: ready
        app.deploy(cfg, wait_s=180)
        assert wait_for(ready, (200, None)) == (200, None)
        body = httpx.get(f"{url}/ready", timeout=10).json()
        assert body == {"status": "ready", "models": {"tiny": {"prefill": 1, "decode": 1}}}
        channel.close()  # the ingress may have been redeployed: a new server on the port
        channel = grpc.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        assert wait_for(grpc_status, health_pb2.HealthCheckResponse.SERVING) == \
            health_pb2.HealthCheckResponse.SERVING
        r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200, r.text

        # the prefill pool loses its last replica: decode replicas prefill,
        # so the API still answers: ready, naming the pool as degraded
        serve.delete(app.app_name("tiny", Role.PREFILL))

        def degraded():
            r = httpx.get(f"{url}/ready", timeout=10)
            return r.status_code, r.json().get("degraded")

        prefill = [{"model": "tiny", "pool": "prefill",
                    "reason": "no live prefill replica; its decode replicas prefill its prompts"}]
        assert wait_for(degraded, (200, prefill)) == (200, prefill)
        assert grpc_status() == health_pb2.HealthCheckResponse.SERVING
        r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200

        # and back
        app.deploy(cfg, wait_s=180)
        assert wait_for(ready, (200, None)) == (200, None)
        channel.close()

        # the API key rotated: the ingress rolls to the new key, the pools
        # (which never read it) keep their replicas
        def replica_ids():
            reps = ray.get(get_router().replicas.remote())["tiny"]
            return {r["replica_id"] for pool in reps.values() for r in pool}

        before = replica_ids()
        rotated = cfg.model_copy(update={"auth": cfg.auth.model_copy(
            update={"api_keys": ["sk-rotated"]})})
        path = tmp_path / "rotated.yaml"
        path.write_text(yaml.safe_dump(rotated.model_dump(mode="json")))
        parser = argparse.ArgumentParser(prog="splitserve")
        cli_ops.add_subcommands(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["deploy", str(path), "--wait-s", "180", "--address",
                                  ray.get_runtime_context().gcs_address])
        capsys.readouterr()
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert "1 change(s):\n  auth: API keys or cluster token changed" in out, out
        assert httpx.get(f"{url}/v1/models", headers=AUTH, timeout=10).status_code == 401
        assert httpx.get(f"{url}/v1/models", timeout=10,
                         headers={"Authorization": "Bearer sk-rotated"}).status_code == 200
        assert replica_ids() == before

        # a router setting edited under streaming load rebuilds both pools
        # (one replica each): a new replica starts before the old one drains,
        # so the router always has a decode replica to place on, and no
        # stream is lost
        client = OpenAI(base_url=f"{url}/v1", api_key="sk-rotated", max_retries=0, timeout=120)
        stop, results, live = threading.Event(), [], []

        def stream(i):
            while not stop.is_set():
                try:
                    chunks = list(client.completions.create(
                        model="tiny", prompt=f"story {i}", max_tokens=12, stream=True))
                    results.append(chunks[-1].choices[0].finish_reason)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    results.append(repr(e))

        def watch():
            while not stop.is_set():
                reps = ray.get(get_router().replicas.remote())["tiny"]["decode"]
                live.append(sum(r["healthy"] and not r["draining"] for r in reps))
                time.sleep(0.1)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        threads.append(threading.Thread(target=watch))
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            edited = rotated.model_copy(update={"router": rotated.router.model_copy(
                update={"max_retries": 3})})
            app.deploy(edited, wait_s=180)
            deadline = time.monotonic() + 60
            while replica_ids() & before and time.monotonic() < deadline:
                time.sleep(0.2)  # the old replicas drain and leave
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        assert not replica_ids() & before, "the pools were not rebuilt"
        ended = {"length", "stop"}  # every stream ran to its end
        assert results and set(results) <= ended, [r for r in results if r not in ended]
        assert min(live) >= 1, f"no placeable decode replica during the rollout: {live}"
