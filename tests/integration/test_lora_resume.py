"""A LoRA request whose decode replica dies mid-stream resumes with its
adapter, on a real local Ray cluster: one prefill and two decode replicas
of a tiny model serving one PEFT adapter, greedy streams through the
ingress's ClusterBackend, and the decode replica serving the first of them
``ray.kill``ed once it has produced a few tokens. Every stream must end with
exactly the engine's own greedy tokens with the adapter, which differ from
the base model's: an adapter dropped on resume would change the tail.
"""

from __future__ import annotations

import asyncio

import psutil
import pytest
import ray

from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.cluster.serve.orchestrator import ClusterBackend
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.lora_adapters import build_adapter
from tests.integration.pd_harness import make_engine
from tests.integration.ray_cluster import local_ray

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [11, 12, 13], [40, 41, 42, 43, 44, 45]]
KILL_AFTER = 3  # tokens of the first stream before its decode replica is killed


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume-adapter") / "sql"
    return build_adapter(tiny_llama, out, seed=21, r=4, target_modules="all-linear")


@pytest.fixture(scope="module")
def reference(tiny_llama, adapter):
    eng = make_engine(tiny_llama, num_blocks=128, max_loras=1)
    eng.add_adapter("sql", str(adapter))
    with_adapter = [r.token_ids for r in eng.generate(PROMPTS, GREEDY, adapters=["sql"] * 3)]
    base = [r.token_ids for r in eng.generate(PROMPTS, GREEDY)]
    for a, b in zip(with_adapter, base):  # the tail after any kill point differs too
        assert a[KILL_AFTER:] != b[KILL_AFTER:]
    return with_adapter


def decode_actor_serving(address: str):
    """The Serve replica actor whose process listens on ``address``."""
    port = int(address.rsplit(":", 1)[1])
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] != "serve" or "tiny-decode" not in a["name"]:
            continue
        actor = ray.get_actor(a["name"], namespace="serve")
        pid = ray.get(actor.__ray_call__.remote(lambda _self: __import__("os").getpid()))
        if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.Process(pid).net_connections(kind="tcp")):
            return actor
    raise AssertionError(f"no decode replica listens on {address}")


def test_streams_cut_by_a_decode_death_resume_with_their_adapter(tiny_llama, adapter, reference):
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    cfg = parse_config({
        "models": [{"model": {"name": "tiny", "path": str(tiny_llama), "num_blocks": 128,
                              "block_size": 4, "max_loras": 1, "max_lora_rank": 4,
                              "adapters": [{"name": "sql", "path": str(adapter)}]},
                    "prefill": pool,
                    "decode": {**pool, "min_replicas": 2, "max_replicas": 2}}],
        "router": {"local_prefill_max_tokens": 0, "stats_period_s": 0.1, "stats_ttl_s": 2.0},
        "auth": {"cluster_token": "lora-resume-token"},
    })

    async def main():
        be = ClusterBackend(cfg)
        try:
            await run(be)
        finally:
            await be.close()

    async def run(be: ClusterBackend):
        killed: list[str] = []

        async def stream(i: int):
            toks, decodes = [], []
            async for d in be.generate("sql", f"r{i}", PROMPTS[i], GREEDY):
                toks += d["token_ids"]
                decodes.append(d["placement"]["decode"])
                if i == 0 and not killed and len(toks) >= KILL_AFTER:
                    killed.append(decodes[-1])
                    ray.kill(decode_actor_serving(decodes[-1]), no_restart=True)
            return toks, decodes
        got = await asyncio.gather(*[stream(i) for i in range(len(PROMPTS))])
        assert [g[0] for g in got] == reference
        # the first stream was cut and went on elsewhere
        assert got[0][1][0] == killed[0] and got[0][1][-1] != killed[0]
        assert be.counters["resumed"] >= 1

    with local_ray(num_cpus=4):
        app.deploy(cfg, with_ingress=False, wait_s=240)
        asyncio.run(main())
