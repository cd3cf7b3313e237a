"""splitserve's metrics on a real local Ray cluster: after traffic through
the HTTP ingress of a deployed prefill + decode pool, /metrics of the HTTP
port serves the request, replica and router metrics with values that match
the traffic sent (one series per replica, exact counts), and Ray's metrics
endpoint exports every metric of ``splitserve.cluster.observability.metrics``
under its ``ray_`` names.

Real events drive the request, worker, router, refusal and fallback
metrics. Preemptions, replica refusals, retries and autoscaler decisions
have no deterministic trigger on a loopback cluster (or no caller yet):
their recording functions are called from this driver, a Ray process like
the replicas, under model "plumbing"."""

import asyncio
import time
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from splitserve.cluster.serve import app
from splitserve.cluster.bench.arrivals import ArrivalSpec
from splitserve.cluster.bench.datasets import BenchRequest, parse_length_dist, synthetic_requests
from splitserve.cluster.bench.phases import has_phase_timings
from splitserve.cluster.bench.runner import HttpTarget, run_load
from splitserve.cluster.bench.stats import compute_stats
from splitserve.cluster.config import parse_config
from splitserve.cluster.autoscaling.records import DecisionRecord
from splitserve.cluster.observability.metrics import (
    METRICS,
    RequestRecorder,
    record_autoscaler_decision,
    record_retry,
    record_worker_metrics,
)
from splitserve.cluster.api.routing import Routing
from splitserve.engine.roles import Role
from splitserve.router.route_messages import RouteTable, RouteWeights, VariantOutcome
from tests.fixtures.worker_stats import decode_stats, engine_load
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port

N, OUT, NUM_BLOCKS = 6, 5, 48
# Each Ray process exports its metrics every EXPORT_PERIOD_MS (Ray's default
# is 10 s: the test would mostly wait for it); a gauge a process stops
# refreshing ages out after two periods, longer than any scrape gap here
EXPORT_PERIOD_MS = 2000
EXPORT_WAIT_S = 45.0  # the cluster is shared and slow


def config(path):
    return parse_config({
        "models": [{"model": {"name": "tiny", "path": str(path), "num_blocks": NUM_BLOCKS,
                              "block_size": 4},
                    "prefill": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5},
                    "decode": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}}],
        "router": {"local_prefill_max_tokens": 0, "stats_period_s": 0.1, "stats_ttl_s": 5.0},
        "auth": {"cluster_token": "metrics-test-token"},
        "endpoints": {"http_port": free_port(), "grpc_port": free_port()},
    })


def scrape() -> list:
    port = ray._private.worker.global_worker.node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith("ray_splitserve_")]


def scrape_api(cfg) -> list:
    url = f"http://127.0.0.1:{cfg.endpoints.http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples, name: str, **labels) -> float:
    """Sum over the series of ``name`` whose labels include ``labels`` (one
    series per Ray worker that recorded it)."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def series(samples, name: str, **labels) -> list:
    return [s for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


class _Present:
    """An expected value: the series exists, whatever its value."""

    def __repr__(self) -> str:
        return "present"


PRESENT = _Present()


def observed(samples, name: str, labels: dict, value):
    if value is PRESENT:
        return PRESENT if series(samples, name, **labels) else "absent"
    return total(samples, name, **labels)


def expect(want: list[tuple[str, dict, object]], timeout=EXPORT_WAIT_S) -> list:
    """Poll the endpoint until every (series, labels, value) holds (each Ray
    process exports on its own EXPORT_PERIOD_MS cadence); assert them; return
    the samples."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape()
        wrong = [(name, labels, value, got) for name, labels, value in want
                 if (got := observed(samples, name, labels, value)) != value]
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not wrong, "\n".join(f"{n}{lab}: want {v!r}, got {g!r}" for n, lab, v, g in wrong)
    return samples


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    with local_ray(num_cpus=4, metrics_report_interval_ms=EXPORT_PERIOD_MS):
        cfg = config(tiny_llama)
        app.deploy(cfg, with_ingress=True, wait_s=180)
        yield cfg


def send(cfg, requests, concurrency=3):
    target = HttpTarget(f"http://127.0.0.1:{cfg.endpoints.http_port}", "tiny", timeout_s=60)
    return asyncio.run(run_load(target, requests, ArrivalSpec(concurrency=concurrency)))


def test_traffic_metrics_exported_with_exact_counts(cluster):
    reqs = synthetic_requests(N, parse_length_dist("uniform:8:20"), parse_length_dist(str(OUT)),
                              seed=1)
    result = send(cluster, reqs)
    assert all(r.ok and r.output_tokens == OUT for r in result.records), \
        [r.error for r in result.records]
    # the ingress forwards the decode replica's phase timings (x-splitserve-timings)
    assert all(has_phase_timings(r.timings) and r.timings["mode"] == "remote"
               for r in result.records)
    stats = compute_stats(result.records, result.duration_s, 10.0, 10.0)
    assert stats.phases["prefill"] > 0 and stats.phases["handoff"] > 0
    # prompt + max_tokens over the decode replica's whole cache: refused by the router,
    # a 400 since no wait would make it fit
    too_big = send(cluster, [BenchRequest(list(range(10, 18)), 8, NUM_BLOCKS * 4)])
    assert too_big.records[0].error.startswith("HTTP 400")

    t = {"model": "tiny"}
    s = expect([
        *[(f"ray_splitserve_{h}_seconds_count", t, N) for h in ("ttft", "tpot", "e2e")],
        ("ray_splitserve_itl_seconds_count", t, N * (OUT - 1)),
        ("ray_splitserve_requests_total", {**t, "outcome": "finished"}, N),
        ("ray_splitserve_requests_total", {**t, "outcome": "refused"}, 1),
        ("ray_splitserve_refusals_total", {**t, "reason": "invalid"}, 1),
        ("ray_splitserve_output_tokens_total", t, N * OUT),
        *[("ray_splitserve_request_phase_seconds_count", {**t, "phase": ph}, N)
          for ph in ("queue", "prefill", "handoff", "decode")],
        ("ray_splitserve_handoff_request_bytes_count", t, N),
        ("ray_splitserve_handoff_bytes_total", t, sum(r.timings["bytes"] for r in result.records)),
        ("ray_splitserve_router_decisions_total", t, N),
        ("ray_splitserve_router_rejections_total", {**t, "reason": "no_capacity"}, 1),
        ("ray_splitserve_router_in_flight", t, 0),
        ("ray_splitserve_pool_replicas", {**t, "pool": "prefill"}, 1),
        ("ray_splitserve_pool_replicas", {**t, "pool": "decode"}, 1),
        ("ray_splitserve_kv_cache_blocks", {**t, "role": "decode"}, NUM_BLOCKS),
        ("ray_splitserve_kv_cache_blocks", {**t, "role": "prefill"}, NUM_BLOCKS),
        *[(f"ray_splitserve_{name}", {**t, "role": role}, PRESENT)
          for role in ("prefill", "decode")
          for name in ("kv_cache_usage_ratio", "pending_prompt_tokens", "running_seqs",
                       "waiting_requests", "prefix_cache_queries_total")],
        # the prompts were looked up in the prefill replica's prefix cache, and in
        # the decode replica's when it reserved blocks for each hand-off: random
        # prompts, all misses on both
        ("ray_splitserve_prefix_cache_hits_total", {**t, "role": "prefill"}, 0.0),
        ("ray_splitserve_prefix_cache_hits_total", {**t, "role": "decode"}, 0.0),
    ])

    # the same numbers on /metrics of the HTTP port: exact, and one series per replica
    api = scrape_api(cluster)
    prompt_tokens = sum(r.prompt_len for r in reqs)
    for name, labels, want in [
        *[(f"splitserve_{h}_seconds_count", t, N) for h in ("ttft", "tpot", "e2e")],
        ("splitserve_itl_seconds_count", t, N * (OUT - 1)),
        ("splitserve_requests_total", {**t, "outcome": "finished"}, N),
        ("splitserve_requests_total", {**t, "outcome": "refused"}, 1),
        ("splitserve_finished_requests_total", {**t, "finish_reason": "length"}, N),
        ("splitserve_output_tokens_total", t, N * OUT),
        ("splitserve_prompt_tokens_total", t, prompt_tokens),
        ("splitserve_request_prompt_tokens_sum", t, prompt_tokens),
        ("splitserve_handoff_bytes_total", t, sum(r.timings["bytes"] for r in result.records)),
        ("splitserve_router_decisions_total", t, N),
        ("splitserve_router_rejections_total", {**t, "reason": "no_capacity"}, 1),
        ("splitserve_router_in_flight", t, 0),
        ("splitserve_pool_replicas", {**t, "pool": "prefill"}, 1),
        ("splitserve_pool_replicas", {**t, "pool": "decode"}, 1),
        ("splitserve_kv_cache_blocks", {**t, "role": "decode"}, NUM_BLOCKS),
        ("splitserve_kv_cache_blocks", {**t, "role": "prefill"}, NUM_BLOCKS),
        ("splitserve_running_seqs", {**t, "role": "decode"}, 0),
        ("splitserve_prefix_cache_hits_total", {**t, "role": "prefill"}, 0),
    ]:
        assert total(api, name, **labels) == want, (name, labels)
    for role in ("prefill", "decode"):  # a series per replica, named by its address
        queries = series(api, "splitserve_prefix_cache_queries_total", **t, role=role)
        assert len(queries) == 1 and queries[0].labels["replica"].startswith("127.0.0.1:")
        assert queries[0].value >= N
    assert total(api, "splitserve_ttft_seconds_sum", **t) > 0
    assert not [x for x in api if x.name.startswith(("ray_", "vllm:", "splitserve_autoscaler"))]


def expire_a_silent_ingress_slot(model: str) -> None:
    """A router's view of an ingress that took a slot and went silent: the
    slot expires, and the router's metrics say so."""
    from splitserve.cluster.observability.metrics import RouterMetrics
    from splitserve.router.config import ModelFacts, RouterConfig
    from splitserve.router.exchange import Exchange, RouteCall
    from splitserve.router.service import RouterService
    from splitserve.router.types import RouteRequest

    now = [0.0]
    svc = RouterService(RouterConfig(models={model: ModelFacts(4, 1024)}, lease_ttl_s=1.0),
                        clock=lambda: now[0])
    req = RouteRequest("r", model, 4, 4, block_hashes=())
    svc.exchange(Exchange(holder="gone", calls=(RouteCall("r", req, 0.0, 0.0),)))  # it waits
    now[0] = 1.5
    svc.tick()
    RouterMetrics().publish(svc, {}, force=True)


def test_fallback_and_remaining_metrics_exported(cluster):
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if "tiny-prefill" in a["name"] and a["namespace"] == "serve"]
    assert len(victims) == 1
    ray.kill(ray.get_actor(victims[0]["name"], namespace="serve"), no_restart=True)
    # the router still holds the dead replica's fresh stats: the decode replica's
    # Prefill call fails and it prefills locally
    result = send(cluster, [BenchRequest(list(range(20, 32)), 12, OUT)])
    rec = result.records[0]
    assert rec.ok and rec.output_tokens == OUT and rec.timings["mode"] == "local"
    assert rec.timings["fallback_reason"]

    p = "plumbing"
    record_worker_metrics(Role.DECODE, p, decode_stats(
        engine_load(free_blocks=3, total_blocks=4, running=1, waiting=0, pending_prompt_tokens=0,
                    preemptions=2, prefix_hits=1, prefix_queries=2, spec_drafts=5,
                    spec_draft_tokens=20, spec_accepted_tokens=12, spec_draft_time_s=0.5,
                    lora_slots=4, lora_slots_in_use=1), refused=3, fallbacks=0))
    rec = RequestRecorder(p)
    rec.on_output({"token_ids": [1], "prompt_tokens": 8, "cached_tokens": 4, "finished": True,
                   "finish_reason": "stop"})
    rec.finish()
    record_retry(p, resumed=False)
    record_retry(p, resumed=True)
    record_autoscaler_decision(DecisionRecord(
        app=f"{p}-decode", model=p, role="decode", bottleneck="memory", time=0.0, running=1,
        current=1, target=2, desired=2, value=1.5, reason="scale up 1 -> 2: KV usage 0.9 > 0.75",
        min=1, max=4, changed=True, prefer_local_prefill=None))
    expire_a_silent_ingress_slot(p)
    # a route's table and one routed request's outcome, as an ingress records them
    routing = Routing(RouteTable(1, (RouteWeights("plumbing-route", (p,), (1.0,)),)))
    routing.record(VariantOutcome("plumbing-route", p, True, 0.1, 0.01))

    tiny = {"model": "tiny"}
    decode = {"model": p, "role": "decode"}
    s = expect([
        ("ray_splitserve_fallbacks_total", tiny, 1),
        ("ray_splitserve_replica_fallbacks_total", {**tiny, "role": "decode"}, 1),
        # the fallback prefilled on the decode replica: one more prefix-cache lookup, a miss
        ("ray_splitserve_prefix_cache_queries_total", {**tiny, "role": "decode"}, PRESENT),
        ("ray_splitserve_prefix_cache_hits_total", {**tiny, "role": "decode"}, 0.0),
        ("ray_splitserve_preemptions_total", decode, 2),
        ("ray_splitserve_replica_refusals_total", decode, 3),
        ("ray_splitserve_prefix_cache_queries_total", decode, 2),
        ("ray_splitserve_prefix_cache_hits_total", decode, 1),
        ("ray_splitserve_cached_prompt_tokens_total", {"model": p}, 4),
        ("ray_splitserve_finished_requests_total", {"model": p, "finish_reason": "stop"}, 1),
        ("ray_splitserve_retries_total", {"model": p, "kind": "replaced"}, 1),
        ("ray_splitserve_retries_total", {"model": p, "kind": "resumed"}, 1),
        ("ray_splitserve_autoscaler_target_replicas", {"model": p, "pool": "decode"}, 2),
        ("ray_splitserve_autoscaler_desired_replicas", {"model": p, "pool": "decode"}, 2),
        ("ray_splitserve_autoscaler_load", {"model": p, "pool": "decode"}, 1.5),
        ("ray_splitserve_autoscaler_last_decision",
         {"model": p, "decision": "up", "reason": "scaled", "bottleneck": "memory"}, 1),
        ("ray_splitserve_router_lease_events_total", {"event": "expired"}, 1),
        ("ray_splitserve_route_requests_total",
         {"route": "plumbing-route", "variant": p, "outcome": "ok"}, 1),
        ("ray_splitserve_route_weight", {"route": "plumbing-route", "variant": p}, 1.0),
        ("ray_splitserve_spec_decode_accepted_tokens_total", decode, 12),
        ("ray_splitserve_lora_slots_in_use", decode, 1),
    ])
    # every metric of splitserve.cluster.observability.metrics is exported under its dashboard names
    exported = {x.name for x in s}
    missing = [n for d in METRICS.values() for n in d.exported_names() if n not in exported]
    assert not missing, missing
