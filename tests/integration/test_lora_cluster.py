"""LoRA adapters through the whole cluster on a real local Ray node.

One model, prefill and decode pools (every prompt prefilled remotely, so
each request's adapter crosses the KV hand-off), one adapter slot per
replica: two adapters and the base model in concurrent requests through
the official openai client must each equal the engine's own greedy output
(and so PEFT's, tests/unit/test_lora_engine.py), whichever adapter the
slot holds. Adapters come from the YAML and from the runtime API: load,
request, unload, then 404; the API's 400 / 404 / 409 / 401 answers; a
runtime-loaded adapter outlives the ingress process and reaches every
ingress.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest
import ray
from openai import OpenAI

from splitserve.cluster.api.adapter_registry import AdapterConflict, UnknownAdapter
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from splitserve.cluster.serve.adapter_store import AdapterStore
from splitserve.cluster.serve.orchestrator import ClusterBackend
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.lora_adapters import build_adapter
from tests.fixtures.ports import free_port
from tests.integration.ray_cluster import local_ray

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

KEY = "sk-lora-test"
PROMPTS = ["the quick brown fox", "once upon a time there was", "hello world, this is"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def adapters(tiny_checkpoints, tmp_path_factory):
    base = tiny_checkpoints["llama"]
    root = tmp_path_factory.mktemp("cluster-adapters")
    return base, {
        "sql": build_adapter(base, root / "sql", seed=11, r=4, target_modules=("q_proj", "v_proj")),
        "chat": build_adapter(base, root / "chat", seed=12, r=8, lora_alpha=16,
                              target_modules="all-linear"),
        "late": build_adapter(base, root / "late", seed=13, r=2,
                              target_modules=("o_proj", "down_proj")),
        "dora": build_adapter(base, root / "dora", seed=14, r=4, use_dora=True),
    }


@pytest.fixture(scope="module")
def reference(adapters):
    """name (None: the base model) -> the engine's greedy text of each prompt."""
    base, paths = adapters
    eng = LLMEngine(EngineConfig(model=str(base), num_blocks=256, block_size=4, max_loras=2))
    for n in ("sql", "chat", "late"):
        eng.add_adapter(n, str(paths[n]))
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    out = {}
    for name in ("sql", "chat", "late", None):
        out[name] = [r.text for r in eng.generate(PROMPTS, greedy, adapters=[name] * len(PROMPTS))]
    assert len({tuple(v) for v in out.values()}) == 4  # every adapter changes the text
    return out


@pytest.fixture(scope="module")
def cluster(adapters):
    base, paths = adapters
    http, grpc_port = free_port(), free_port()
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    cfg = parse_config({
        "models": [{"model": {"name": "llama", "path": str(base), "num_blocks": 128,
                              "block_size": 4, "max_loras": 1, "max_lora_rank": 8,
                              "adapters": [{"name": "sql", "path": str(paths["sql"])},
                                           {"name": "chat", "path": str(paths["chat"])}]},
                    "prefill": pool, "decode": pool}],
        "router": {"local_prefill_max_tokens": 0},
        "auth": {"api_keys": [KEY], "cluster_token": "lora-token"},
        "endpoints": {"http_port": http, "grpc_port": grpc_port},
    })
    with local_ray(num_cpus=4):
        app.deploy(cfg, wait_s=240)
        yield cfg


def client(cfg, key=KEY) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=key,
                  max_retries=0, timeout=120)


def complete(c: OpenAI, model: str, prompt: str) -> str:
    out = c.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                               extra_body={"ignore_eos": True})
    return out.choices[0].text


def test_adapters_and_base_in_concurrent_requests(cluster, reference):
    c = client(cluster)
    cards = {m.id: m for m in c.models.list().data}
    assert sorted(cards) == ["chat", "llama", "sql"]
    assert cards["sql"].parent == "llama" and cards["llama"].parent is None
    jobs = [(name, i) for _ in range(2) for i in range(len(PROMPTS)) for name in ("sql", "chat", None)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: complete(c, j[0] or "llama", PROMPTS[j[1]]), jobs))
    for (name, i), text in zip(jobs, got):
        assert text == reference[name][i], (name, i)
    # streamed, and through the chat route, an adapter is a model like any other
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="chat", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if ch.choices)
    assert streamed == reference["chat"][0]


def test_runtime_load_request_unload(cluster, adapters, reference, tmp_path):
    _, paths = adapters
    c = client(cluster)
    http = httpx.Client(base_url=f"http://127.0.0.1:{cluster.endpoints.http_port}",
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(paths["late"])})
    assert r.status_code == 200 and r.json()["parent"] == "llama"
    assert [complete(c, "late", p) for p in PROMPTS] == reference["late"]
    assert c.models.retrieve("late").parent == "llama"
    # taken name 409; unserved feature 400 naming the field; missing folder 400
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(paths["sql"])})
    assert r.status_code == 409 and r.json()["error"]["param"] == "lora_name"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": str(paths["dora"])})
    assert r.status_code == 400 and r.json()["error"]["param"] == "use_dora"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    # a config nested past the stack (once a 500), beside the weights of an adapter that loads
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    (nested / "adapter_model.safetensors").write_bytes((paths["sql"] / "adapter_model.safetensors").read_bytes())
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(nested)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 400
    assert httpx.post(f"{http.base_url}/v1/load_lora_adapter",
                      json={"lora_name": "y", "lora_path": str(paths["sql"])}).status_code == 401
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(c, "late", PROMPTS[0])
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert "late" not in {m.id for m in c.models.list().data}
    # the YAML's adapters still serve
    assert complete(c, "sql", PROMPTS[1]) == reference["sql"][1]


def test_grpc_lists_adapters_with_parent(cluster):
    with grpc.insecure_channel(f"127.0.0.1:{cluster.endpoints.grpc_port}") as ch:
        stub = pb_grpc.GenerationStub(ch)
        cards = stub.ListModels(pb.ListModelsRequest(),
                                metadata=[("authorization", f"Bearer {KEY}")]).models
    parents = {m.name: m.parent for m in cards}
    assert parents["sql"] == "llama" and parents["llama"] == ""


def ingress_actor_name() -> str | None:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "ingress" in a["name"]]
    return names[0] if len(names) == 1 else None


def models_now(http: httpx.Client) -> set[str] | None:
    """The served model names, None while the ingress does not answer."""
    try:
        r = http.get("/v1/models")
    except httpx.HTTPError:
        return None
    return {m["id"] for m in r.json()["data"]} if r.status_code == 200 else None


def wait_for(pred, timeout_s: float = 120.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_runtime_adapters_survive_an_ingress_restart_and_reach_every_ingress(
        cluster, adapters, reference):
    """Runtime-loaded adapters live in the cluster's store, not the ingress
    process: Serve's replacement of a killed ingress serves them, a second
    ingress (a ClusterBackend in this driver) sees loads and unloads made
    through the first, and the operator's adapters stay the config's."""
    _, paths = adapters
    c = client(cluster)
    http = httpx.Client(base_url=f"http://127.0.0.1:{cluster.endpoints.http_port}",
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(paths["late"])})
    assert r.status_code == 200
    before = ingress_actor_name()
    ray.kill(ray.get_actor(before, namespace="serve"), no_restart=True)
    wait_for(lambda: ingress_actor_name() not in (None, before) and models_now(http))
    assert models_now(http) == {"llama", "sql", "chat", "late"}
    assert [complete(c, "late", p) for p in PROMPTS] == reference["late"]
    # the operator's adapters are the config's: neither unloaded nor replaced at run time
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 409
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "load_inplace": True,
                                                  "lora_path": str(paths["late"])})
    assert r.status_code == 409 and r.json()["error"]["param"] == "lora_name"

    async def second_ingress():
        be = ClusterBackend(cluster, adapter_store=AdapterStore())
        try:
            await be.start()  # serves what the first loaded
            assert be.resolve_adapter("late").ref.path == str(paths["late"])
            # the name is taken cluster-wide
            with pytest.raises(AdapterConflict):
                await be.load_adapter("late", str(paths["sql"]))
            await be.unload_adapter("late")  # through this one: gone from the first too
            await asyncio.to_thread(wait_for, lambda: "late" not in (models_now(http) or {"late"}))
            with pytest.raises(UnknownAdapter):
                await be.unload_adapter("late")
        finally:
            await be.close()
    asyncio.run(second_ingress())
    with pytest.raises(openai.NotFoundError):
        complete(c, "late", PROMPTS[0])
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert AdapterStore().all() == {}
    assert complete(c, "sql", PROMPTS[1]) == reference["sql"][1]
