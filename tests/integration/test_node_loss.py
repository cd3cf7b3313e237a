"""A whole node lost, on a real multi-node Ray cluster on loopback
(``autoscale_cluster``): the prefill pool on a worker node, the decode
pool on the head. The prefill node is killed at once (its raylet and every
worker on it, as a reclaimed spot node): requests go on being answered,
decode replicas prefilling them, with the same greedy text; ``/ready``
stays 200 and names the prefill pool as degraded (a load balancer must not
drop a cluster that still answers); ``splitserve status`` still reports the
cluster; and once the node is back the pool returns to its size, with no
admission slot or sequence left held."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import ray
import yaml

from splitserve.cluster.cli.main import main as cli_main
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve.router_actor import get_router
from tests.fixtures.ports import free_port
from tests.integration.autoscale_cluster import LocalCluster, NodeSpec, running

pytestmark = pytest.mark.slow

KEY = "sk-node-loss"
PROMPT, MAX_TOKENS = "once upon a time there", 12
PREFILL_NODE = NodeSpec({"prefill_node": 4})


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    # the head carries the decode pool: one node fewer to start
    c = LocalCluster(NodeSpec({"head_node": 1, "decode_node": 4}, num_cpus=2), [PREFILL_NODE])
    http = free_port()
    cfg = {
        "name": "node-loss",
        "models": [{"model": {"name": "tiny", "path": str(tiny_llama), "num_blocks": 256,
                              "block_size": 4},
                    "prefill": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0,
                                "node_type": "prefill_node"},
                    "decode": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0,
                               "node_type": "decode_node"}}],
        # every prompt through the prefill pool while it has a replica
        "router": {"local_prefill_max_tokens": 0, "stats_period_s": 0.1, "stats_ttl_s": 2.0},
        "transfer": {"transport": "grpc"},
        "auth": {"api_keys": [KEY], "cluster_token": "node-loss-token"},
        "endpoints": {"host": "127.0.0.1", "http_port": http, "grpc_port": free_port()},
    }
    parse_config(cfg)  # the file below is valid
    path = tmp_path_factory.mktemp("node-loss") / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with running(c):
        # deployed as an operator would, by the CLI in its own process: this
        # test process has run other Ray clusters, whose Serve client state a
        # driver-side deploy here could meet
        done = subprocess.run([sys.executable, "-m", "splitserve.cluster.cli", "deploy",
                               str(path), "--address", c.address, "--wait-s", "240"],
                              env=c.env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        ray.init(address=c.address)
        yield c, f"http://127.0.0.1:{http}"


def complete(http: httpx.Client, base: str) -> tuple[int, str]:
    r = http.post(f"{base}/v1/completions", json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True})
    return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text


def ready(http: httpx.Client, base: str) -> tuple[int, dict]:
    r = http.get(f"{base}/ready")
    return r.status_code, r.json()


def router_pools() -> dict[str, int]:
    reps = ray.get(get_router().replicas.remote(), timeout=10)["tiny"]
    return {role: len(v) for role, v in reps.items()}


def wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = cond()
        except (httpx.HTTPError, ValueError, ray.exceptions.RayActorError,
                ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            # the API's connection on the lost node, a reply cut short, a
            # router that ran there and is being restarted
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.5)


def test_prefill_node_lost_decode_serves_and_the_pool_returns(cluster, capsys):
    c, base = cluster
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(headers=headers, timeout=60) as http:
        code, reference = complete(http, base)
        assert code == 200 and reference
        assert ready(http, base)[0] == 200

        c.kill_node(1)  # the raylet and every worker of the prefill node at once
        lost_at = time.monotonic()

        # the router forgets the prefill replica (no heartbeat to the router
        # within stats_ttl_s); /ready stays 200 and says what is lost
        wait_for(lambda: router_pools() == {"prefill": 0, "decode": 1}, 30,
                 "the router to drop the lost prefill replica")
        code, body = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(ready(http, base)),
                              30, "/ready to answer 200")
        assert body["models"]["tiny"] == {"prefill": 0, "decode": 1}, body
        assert body["degraded"] == [{"model": "tiny", "pool": "prefill", "reason":
                                     "no live prefill replica; its decode replicas prefill "
                                     "its prompts"}], body
        forgotten_s = time.monotonic() - lost_at

        # every request is answered, prefilled on the decode replica, same text
        for _ in range(4):
            assert complete(http, base) == (200, reference)
            assert ready(http, base)[0] == 200

        # the operator's view still knows the cluster (the ops ledger may have
        # run on the lost node)
        capsys.readouterr()
        assert cli_main(["status", "--address", c.address]) == 0
        out = capsys.readouterr().out
        assert "tiny-prefill" in out and "tiny-decode" in out, out

        # the node comes back: the pool returns to its size and serves
        c.add_worker(PREFILL_NODE)
        wait_for(lambda: router_pools() == {"prefill": 1, "decode": 1}, 120,
                 "the prefill pool to return")
        code, body = ready(http, base)
        assert code == 200 and "degraded" not in body, body
        assert complete(http, base) == (200, reference)

        # nothing left held: no admission slot at the router (an ingress on
        # the lost node held none past router.lease_ttl_s), no sequence on decode
        def idle():
            counters = ray.get(get_router().counters.remote(), timeout=10)
            decode = ray.get(get_router().replicas.remote(), timeout=10)["tiny"]["decode"]
            return (counters["in_flight"] == {"tiny": 0}
                    and all(d["running_seqs"] == 0 and d["waiting_requests"] == 0 for d in decode))
        wait_for(idle, 30, "the slots and sequences to be released")
    print(f"prefill replica forgotten {forgotten_s:.1f} s after its node was lost")
