"""Tensor parallelism through the cluster, on a real local Ray node: the
prefill pool runs at TP=2 (rank 0 in the Serve replica, rank 1 a process
it starts), the decode pool at TP=1, and KV moves between them over gRPC
in one-layer chunks gathered from both ranks inside the prefill step.
Completions through the official openai client equal a TP=1 engine's."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.pd_harness import make_engine
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port

KEY = "sk-tp-test"
MODEL = "tp-llama"

pytestmark = pytest.mark.slow


def replica_children(app_name: str) -> dict[int, list[int]]:
    """Pid of each Serve replica of ``app_name`` -> pids of the processes it
    spawned (tensor-parallel ranks start through multiprocessing's spawn)."""
    procs: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(d.name)] = (ppid, cmd)
    replicas = [pid for pid, (_, cmd) in procs.items()
                if "ServeReplica" in cmd and f"{app_name}:" in cmd]
    return {r: [pid for pid, (ppid, cmd) in procs.items() if ppid == r and "spawn_main" in cmd]
            for r in replicas}


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    http, grpc_port = free_port(), free_port()
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    cfg = parse_config({
        "models": [{"model": {"name": MODEL, "path": str(path), "num_blocks": 128, "block_size": 4},
                    "prefill": {**pool, "engine": {"tensor_parallel_size": 2}},
                    "decode": pool}],
        "router": {"local_prefill_max_tokens": 0},
        "transfer": {"transport": "grpc", "layer_group_size": 1},
        "auth": {"api_keys": [KEY], "cluster_token": "tp-token"},
        "endpoints": {"http_port": http, "grpc_port": grpc_port},
    })
    with local_ray(num_cpus=4):
        app.deploy(cfg, wait_s=240)
        yield cfg, path


def test_tp2_prefill_pool_hands_off_to_tp1_decode_with_engine_parity(cluster):
    cfg, path = cluster
    children = replica_children(f"{MODEL}-prefill")
    assert [len(c) for c in children.values()] == [1]  # one replica, its rank-1 process
    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    eng = make_engine(path, block_size=4)
    for prompt in ("the quick brown fox", "a much longer prompt that spans several blocks of KV"):
        want = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0))[0]
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        assert out.choices[0].text == want.text
        assert out.usage.completion_tokens == len(want.token_ids)
        seeded = SamplingParams(max_tokens=8, temperature=0.9, seed=11)
        want_s = eng.generate([prompt], seeded)[0]
        got_s = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                          temperature=0.9, seed=11)
        assert got_s.choices[0].text == want_s.text
