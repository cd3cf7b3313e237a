"""/ready means the API answers: from the first moment it says 200, /v1
answers every configured model, with no 404 and no 503. On a real local
Ray cluster with two routers: a first deploy (as ``splitserve serve``
does it), then a redeploy that adds a model while the old ingress still
runs (its replica does not know the new model until Serve replaces it)."""

import collections
import threading
import time

import httpx
import pytest

from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app, rollout, secrets
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.slow

KEY = "sk-ready-served"
AUTH = {"Authorization": f"Bearer {KEY}"}
HAMMER_S = 5.0
CLIENTS = 4


def config(tiny_llama, models, http_port, grpc_port):
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    return parse_config({
        "models": [{"model": {"name": m, "path": str(tiny_llama), "num_blocks": 64,
                              "block_size": 4}, "mode": "colocated", "decode": pool}
                   for m in models],
        "router": {"stats_period_s": 0.2, "stats_ttl_s": 2.0, "routers": 2},
        "auth": {"api_keys": [KEY], "cluster_token": "ready-served-token"},
        "endpoints": {"http_port": http_port, "grpc_port": grpc_port},
        "observability": {"unauthenticated_routes": ["health"]},
    })


def first_ready_then_hammer(url: str, models: list[str], statuses: list, timeout_s=240.0):
    """Poll /ready; from its first 200, send completions for every model
    from CLIENTS threads for HAMMER_S seconds; record each status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    else:
        statuses.append(("never ready", None, ""))
        return

    def client():
        stop = time.monotonic() + HAMMER_S
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < stop:
                for m in models:
                    r = c.post(f"{url}/v1/completions", headers=AUTH,
                               json={"model": m, "prompt": "hi", "max_tokens": 1})
                    statuses.append((m, r.status_code, r.text[:200]))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def failures(statuses):
    return [s for s in statuses if s[1] != 200][:5]


def test_from_the_first_ready_every_model_answers(tiny_llama):
    http_port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    first = config(tiny_llama, ["a"], http_port, grpc_port)
    second = config(tiny_llama, ["a", "b"], http_port, grpc_port)
    with local_ray(num_cpus=4):
        # a first deploy: /ready is watched from before it starts
        statuses: list = []
        watcher = threading.Thread(target=first_ready_then_hammer, args=(url, ["a"], statuses))
        watcher.start()
        app.deploy(first, wait_s=240)
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 200  # deploy waited for it
        watcher.join()
        counts = collections.Counter(s[:2] for s in statuses)
        assert failures(statuses) == [] and counts[("a", 200)] > 0, counts

        # a redeploy that adds "b": once the new ingress config is published,
        # the old replica (which would answer 404 for "b") is not ready
        version = secrets.publish(second)
        deploying = threading.Thread(target=app.deploy, args=(second,), kwargs={"wait_s": 240})
        deploying.start()
        want = rollout.ingress_digest(second, version)
        deadline = time.monotonic() + 60
        while rollout.target() != want and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rollout.target() == want
        statuses = []
        first_ready_then_hammer(url, ["a", "b"], statuses)
        deploying.join()
        counts = collections.Counter(s[:2] for s in statuses)
        assert failures(statuses) == [] and counts[("b", 200)] > 0, counts
