"""/metrics' body without a server: replica series from stats reports, the
router's text passed through, request metrics with exact sums, vLLM's
names on request; and readiness from the router's live replica counts."""

import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.cluster.api.backend import ClusterMetrics, PoolReadiness, Readiness
from splitserve.cluster.api.health import cluster_readiness
from splitserve.cluster.config import parse_config
from splitserve.cluster.observability.exposition import render
from splitserve.cluster.observability.metrics import METRICS, RequestRecorder
from splitserve.cluster.observability.vllm_names import VLLM_ALIASES
from splitserve.cluster.serve.router_actor import RouterActor
from splitserve.engine.roles import Role
from splitserve.router.config import ModelFacts, RouterConfig
from splitserve.router.reports import ReplicaInfo, StatsReport
from tests.fixtures.worker_stats import decode_stats, engine_load, prefill_stats

MODEL = "expo"


def report(rid: str, role: Role, stats, model: str = MODEL, healthy=True, draining=False,
           age_s: float = 0.0) -> StatsReport:
    return StatsReport(replica=ReplicaInfo(replica_id=rid, role=role, model=model, kv_endpoint="",
                                           node_id=""),
                       stats=stats, healthy=healthy, draining=draining,
                       updated_at=time.time() - age_s, stored=(), evicted=(), snapshot=False)


def router_text() -> str:
    reg = CollectorRegistry()
    Counter("splitserve_router_decisions", "d", ["model", "reason"], registry=reg).labels(
        model=MODEL, reason="cost").inc(3)
    Gauge("splitserve_router_in_flight", "f", ["model"], registry=reg).labels(model=MODEL).set(2)
    Gauge("something_else", "not ours", registry=reg).set(1)
    return generate_latest(reg).decode()


def samples(body: bytes, model_label: str = "model", model: str = MODEL) -> dict:
    """(sample name, labels but the model) -> value, and family name -> type."""
    values, types = {}, {}
    for fam in text_string_to_metric_families(body.decode()):
        types[fam.name] = fam.type
        for s in fam.samples:
            if s.labels.get(model_label) == model and not s.name.endswith("_created"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != model_label))
                values[(s.name, labels)] = s.value
    return values, types


@pytest.fixture(scope="module")
def cluster() -> ClusterMetrics:
    prefill = prefill_stats(engine_load(pending_prompt_tokens=40, running=1, prefix_queries=9,
                                        prefix_hits=4, preemptions=0))
    decode = decode_stats(engine_load(free_blocks=25, total_blocks=100, running=3, waiting=2,
                                      preemptions=7, prefix_queries=5, prefix_hits=1,
                                      spec_drafts=4, spec_draft_tokens=10, spec_accepted_tokens=6,
                                      spec_draft_time_s=0.25),
                          refused=2, fallbacks=1)
    rec = RequestRecorder(MODEL, clock=iter([0.0, 0.5, 0.75, 1.5]).__next__)
    rec.on_output({"token_ids": [4], "prompt_tokens": 20, "cached_tokens": 16, "finished": False})
    rec.on_output({"token_ids": [5], "finished": False})
    rec.on_output({"token_ids": [6, 7], "finished": True, "finish_reason": "stop"})
    rec.finish()
    return ClusterMetrics(reports=(report("10.0.0.1:5", Role.PREFILL, prefill),
                                   report("10.0.0.2:5", Role.DECODE, decode)),
                          router_text=router_text())


def test_replica_router_and_request_metrics(cluster):
    got, types = samples(render(cluster))
    p, d = (("replica", "10.0.0.1:5"), ("role", "prefill")), (("replica", "10.0.0.2:5"),
                                                                ("role", "decode"))
    assert got[("splitserve_pending_prompt_tokens", p)] == 40
    assert got[("splitserve_running_seqs", d)] == 3
    assert got[("splitserve_waiting_requests", d)] == 2
    assert got[("splitserve_kv_cache_usage_ratio", d)] == 0.75
    assert got[("splitserve_kv_cache_blocks", d)] == 100
    assert got[("splitserve_preemptions_total", d)] == 7
    assert got[("splitserve_prefix_cache_queries_total", p)] == 9
    assert got[("splitserve_prefix_cache_hits_total", p)] == 4
    assert got[("splitserve_replica_refusals_total", d)] == 2
    assert got[("splitserve_replica_fallbacks_total", d)] == 1
    assert ("splitserve_replica_refusals_total", p) not in got  # a decode replica's count
    assert got[("splitserve_spec_decode_drafts_total", d)] == 4
    assert got[("splitserve_spec_decode_draft_tokens_total", d)] == 10
    assert got[("splitserve_spec_decode_accepted_tokens_total", d)] == 6
    assert got[("splitserve_spec_decode_draft_seconds_total", d)] == 0.25
    assert ("splitserve_spec_decode_drafts_total", p) not in got  # prefill never speculates
    assert got[("splitserve_router_decisions_total", (("reason", "cost"),))] == 3
    assert got[("splitserve_router_in_flight", ())] == 2
    assert "something_else" not in types  # only the router's splitserve metrics pass
    # request metrics: exact sums, not bucket estimates
    assert got[("splitserve_ttft_seconds_sum", ())] == 0.5
    assert got[("splitserve_e2e_seconds_sum", ())] == 1.5
    assert got[("splitserve_tpot_seconds_sum", ())] == pytest.approx(1.0 / 3)
    assert got[("splitserve_finished_requests_total", (("finish_reason", "stop"),))] == 1
    assert got[("splitserve_prompt_tokens_total", ())] == 20
    assert got[("splitserve_cached_prompt_tokens_total", ())] == 16
    assert got[("splitserve_output_tokens_total", ())] == 4
    for name, d in METRICS.items():  # every family has its declared type
        if name in types:
            assert types[name] == d.kind, name
    assert not any(n.startswith("vllm:") for n in types)


def test_vllm_names_copy_the_numbers(cluster):
    body = render(cluster, vllm_names=True)
    got, types = samples(body, "model_name")
    own, _ = samples(body)
    d = (("replica", "10.0.0.2:5"), ("role", "decode"))
    assert got[("vllm:num_requests_running", d)] == 3
    assert got[("vllm:num_requests_waiting", d)] == 2
    assert got[("vllm:kv_cache_usage_perc", d)] == 0.75
    assert got[("vllm:num_preemptions_total", d)] == 7
    assert got[("vllm:spec_decode_num_drafts_total", d)] == 4
    assert got[("vllm:spec_decode_num_draft_tokens_total", d)] == 10
    assert got[("vllm:spec_decode_num_accepted_tokens_total", d)] == 6
    assert got[("vllm:time_to_first_token_seconds_sum", ())] == 0.5
    assert got[("vllm:time_to_first_token_seconds_count", ())] == \
        own[("splitserve_ttft_seconds_count", ())]
    assert got[("vllm:e2e_request_latency_seconds_sum", ())] == 1.5
    assert got[("vllm:prompt_tokens_total", ())] == 20
    assert got[("vllm:generation_tokens_total", ())] == 4
    assert got[("vllm:prefix_cache_queries_total", ())] == 20
    assert got[("vllm:prefix_cache_hits_total", ())] == 16
    assert got[("vllm:request_success_total", (("finished_reason", "stop"),))] == 1
    queue = [k for k in got if k[0] == "vllm:request_queue_time_seconds_count"]
    assert queue and all(("phase", "queue") not in k[1] and not any(
        lbl == "phase" for lbl, _ in k[1]) for k in queue)  # the phase label is dropped
    assert types["vllm:request_success"] == "counter"
    assert types["vllm:time_to_first_token_seconds"] == "histogram"
    assert {a.vllm for a in VLLM_ALIASES} <= set(types)


def test_readiness_follows_required_pools():
    cfg = parse_config({"models": [
        {"model": {"name": "a", "path": "/x"}},
        {"model": {"name": "b", "path": "/x"}, "mode": "colocated"},
        {"model": {"name": "c", "path": "/x"}, "prefill": {"min_replicas": 0, "max_replicas": 2}},
    ]})
    live = {"a": {"prefill": 1, "decode": 2}, "b": {"colocated": 1}, "c": {"decode": 1}}
    r = cluster_readiness(cfg, live)
    assert r.ready and r.to_dict() == {"status": "ready", "models": {
        "a": {"prefill": 1, "decode": 2}, "b": {"colocated": 1}, "c": {"prefill": 0, "decode": 1}}}
    assert r.degraded == [] and "degraded" not in r.to_dict()
    r = cluster_readiness(cfg, {**live, "a": {"prefill": 1}, "b": {}})
    assert not r.ready
    assert r.missing == [PoolReadiness("a", "decode", 0), PoolReadiness("b", "colocated", 0)]
    assert r.to_dict()["missing"] == [{"model": "a", "pool": "decode"},
                                      {"model": "b", "pool": "colocated"}]
    assert r.reason() == ("model 'a' has no live decode replica; "
                          "model 'b' has no live colocated replica")


def test_readiness_stays_up_without_prefill_replicas():
    """A lost prefill node leaves decode replicas prefilling every prompt:
    the API still answers, so /ready stays 200 (a load balancer keeps
    sending), and names the pool the configuration wants but lacks."""
    cfg = parse_config({"models": [
        {"model": {"name": "a", "path": "/x"}},
        {"model": {"name": "c", "path": "/x"}, "prefill": {"min_replicas": 0, "max_replicas": 2}},
    ]})
    r = cluster_readiness(cfg, {"a": {"decode": 2}, "c": {"decode": 1}})
    assert r.ready and r.missing == []
    assert r.degraded == [PoolReadiness("a", "prefill", 0, required=False, wanted=True)]
    body = r.to_dict()
    assert body["status"] == "ready" and body["models"]["a"] == {"prefill": 0, "decode": 2}
    assert body["degraded"] == [{"model": "a", "pool": "prefill", "reason":
                                 "no live prefill replica; its decode replicas prefill its prompts"}]
    # no decode replica either: nothing answers the model
    r = cluster_readiness(cfg, {"c": {"decode": 1}})
    assert not r.ready and r.missing == [PoolReadiness("a", "decode", 0)]
    down = Readiness(error="the router is unavailable: RayActorError")
    assert not down.ready and down.to_dict()["reason"] == down.error


def test_router_counts_only_live_replicas():
    router = RouterActor.__ray_actor_class__(RouterConfig(policy="cost", stats_ttl_s=5.0, models={
        MODEL: ModelFacts(16, 1000), "other": ModelFacts(16, 1000)}))
    pushes = [report("p0", Role.PREFILL, prefill_stats()),
              report("p1", Role.PREFILL, prefill_stats(), draining=True),
              report("d0", Role.DECODE, decode_stats()),
              report("d1", Role.DECODE, decode_stats(), healthy=False),
              report("d2", Role.DECODE, decode_stats(), age_s=6.0),
              report("c0", Role.COLOCATED, decode_stats(), model="other")]
    for r in pushes:
        router.update_stats(r)
    assert router.live_replicas() == {MODEL: {"prefill": 1, "decode": 1}, "other": {"colocated": 1}}
    reports, text = router.metrics_scrape()
    assert sorted(r.replica.replica_id for r in reports) == ["c0", "d0", "d1", "d2", "p0", "p1"]
    assert all(r.stored == () for r in reports)
    assert "splitserve_pool_replicas" in text
    router.remove_replica("d0")
    assert router.live_replicas()[MODEL] == {"prefill": 1}
    assert "d0" not in {r.replica.replica_id for r in router.metrics_scrape()[0]}


def test_operators_guide_lists_every_metric_and_vllm_name():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "operators.md").read_text()
    for d in METRICS.values():
        name = d.dashboard_names()[0].removesuffix("_bucket")
        assert f"`{name}`" in text, name
    for a in VLLM_ALIASES:
        suffix = "_total" if METRICS[a.source].kind == "counter" else ""
        assert f"`{a.vllm}{suffix}`" in text, a.vllm
