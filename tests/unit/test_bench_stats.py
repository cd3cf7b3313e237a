"""The load generator's pure parts: statistics against hand-computed values
from constructed timestamps, the phase splits, arrival processes, length
distributions and ShareGPT parsing."""

import json
import math

import msgspec
import numpy as np
import pytest

from splitserve.cluster.autoscaling.records import DecisionRecord
from splitserve.cluster.bench.arrivals import ArrivalSpec, arrival_offsets
from splitserve.cluster.bench.datasets import (
    DatasetError,
    LengthDist,
    load_sharegpt,
    parse_length_dist,
    synthetic_requests,
)
from splitserve.cluster.bench.phases import phase_breakdown, ttft_breakdown
from splitserve.cluster.bench.record import write_json
from splitserve.cluster.bench.report import format_table, record
from splitserve.cluster.bench.runner import RunResult
from splitserve.cluster.bench.stats import RequestRecord, Summary, compute_stats, meets_slo
from splitserve.cluster.bench.sweep import SweepPoint, parse_counts, parse_rates


def rec(i, send, chunks, tokens=None, error=None, timings=None):
    return RequestRecord(i, 10, 5, send_time=send, chunk_times=list(chunks),
                         output_tokens=len(chunks) if tokens is None else tokens, error=error,
                         timings=timings)


# Four requests over a 10 s run; SLOs TTFT <= 0.5 s, TPOT <= 0.2 s.
RECORDS = [
    # ttft 0.2, tpot (1.0 - 0.2) / 4 = 0.2 (meets, on the edge), e2e 1.0, itl 0.2 x 4
    rec(0, 0.0, [0.2, 0.4, 0.6, 0.8, 1.0]),
    # ttft 1.0 (misses TTFT), tpot 0.1, e2e 1.2, itl 0.1 x 2
    rec(1, 1.0, [2.0, 2.1, 2.2]),
    # one output of 3 tokens: ttft 0.3, tpot (3.0 - 3.0) / 2 = 0, e2e 0.3, no itl
    rec(2, 2.7, [3.0], tokens=3),
    # failed: counts against attainment, not in latencies
    rec(3, 4.0, [], error="HTTP 503: no replica"),
]


def test_stats_exact_values():
    s = compute_stats(RECORDS, duration_s=10.0, ttft_slo_s=0.5, tpot_slo_s=0.2)
    assert (s.num_requests, s.completed, s.failed) == (4, 3, 1)
    assert s.request_throughput == pytest.approx(0.3)
    assert s.output_throughput == pytest.approx((5 + 3 + 3) / 10)
    assert s.goodput == pytest.approx(2 / 10)  # requests 0 and 2
    assert s.slo_attainment == pytest.approx(2 / 4)
    ttfts = [0.2, 1.0, 0.3]
    assert s.ttft.mean == pytest.approx(0.5)
    assert s.ttft.p50 == pytest.approx(0.3)
    # numpy linear interpolation on the sorted [0.2, 0.3, 1.0]: rank 0.9 * 2 = 1.8
    assert s.ttft.p90 == pytest.approx(0.3 + 0.8 * 0.7)
    assert s.ttft.p99 == pytest.approx(0.3 + 0.98 * 0.7)
    assert s.ttft.p99 == pytest.approx(float(np.percentile(ttfts, 99)))
    assert s.tpot.count == 3
    assert s.tpot.mean == pytest.approx((0.2 + 0.1 + 0.0) / 3)
    assert s.itl.count == 6
    assert s.itl.mean == pytest.approx((0.2 * 4 + 0.1 * 2) / 6)
    assert s.itl.p50 == pytest.approx(0.2)
    assert s.e2e.mean == pytest.approx((1.0 + 1.2 + 0.3) / 3)
    assert s.errors == {"HTTP 503: no replica": 1}
    assert math.isnan(s.phases["queue"])  # no server timings in these records


def test_slo_edges_and_single_token():
    one = rec(0, 0.0, [0.5])  # one token: no TPOT, TTFT exactly on the SLO
    assert one.tpot is None and meets_slo(one, 0.5, 0.01)
    assert not meets_slo(one, 0.4999, 0.01)
    assert not meets_slo(rec(1, 0.0, [], error="x"), 10, 10)
    empty = Summary.of([])
    assert empty.count == 0 and math.isnan(empty.p50)
    with pytest.raises(ValueError, match="duration_s"):
        compute_stats(RECORDS, 0.0, 1, 1)


REMOTE = {"mode": "remote", "ttft_s": 0.9, "prefill_s": 0.5, "handoff_s": 0.7, "bytes": 4096}


def test_phase_breakdown_remote_and_local():
    p = phase_breakdown(1.0, 3.0, REMOTE)
    assert p == pytest.approx({"queue": 0.1, "prefill": 0.5, "handoff": 0.4, "decode": 2.0})
    assert sum(p.values()) == pytest.approx(3.0)
    t = ttft_breakdown(1.0, REMOTE)
    assert t == pytest.approx({"queue": 0.1, "prefill": 0.5, "transfer": 0.2, "first_token": 0.2})
    assert sum(t.values()) == pytest.approx(1.0)
    local = {"mode": "local", "ttft_s": 0.9, "fallback_reason": "prefill replica down"}
    assert phase_breakdown(1.0, 3.0, local) == pytest.approx(
        {"queue": 0.1, "prefill": 0.9, "handoff": 0.0, "decode": 2.0})
    assert ttft_breakdown(1.0, local) == pytest.approx(
        {"queue": 0.1, "prefill": 0.9, "transfer": 0.0, "first_token": 0.0})
    # the wait in the prefilling engine's queue moves from prefill to queue
    queued = {**REMOTE, "prefill_queue_s": 0.2}
    assert phase_breakdown(1.0, 3.0, queued) == pytest.approx(
        {"queue": 0.3, "prefill": 0.3, "handoff": 0.4, "decode": 2.0})
    assert ttft_breakdown(1.0, queued) == pytest.approx(
        {"queue": 0.3, "prefill": 0.3, "transfer": 0.2, "first_token": 0.2})
    assert phase_breakdown(1.0, 3.0, {**local, "local_queue_s": 0.4}) == pytest.approx(
        {"queue": 0.5, "prefill": 0.5, "handoff": 0.0, "decode": 2.0})
    # an ingress's own keys do not split anything: TTFT is prefill
    assert phase_breakdown(1.0, 1.5, {"ingress_ttft_s": 0.99}) == pytest.approx(
        {"queue": 0.0, "prefill": 1.0, "handoff": 0.0, "decode": 0.5})


def test_stats_phase_means_use_server_timings():
    rs = [rec(0, 0.0, [1.0, 2.0, 3.0], timings=REMOTE),
          rec(1, 0.0, [1.0, 1.5], timings={"mode": "local", "ttft_s": 0.7})]
    s = compute_stats(rs, 3.0, 10, 10)
    assert s.phases == pytest.approx({"queue": 0.2, "prefill": 0.6, "handoff": 0.2,
                                      "decode": 1.25})
    assert s.ttft_parts == pytest.approx({"queue": 0.2, "prefill": 0.6, "transfer": 0.1,
                                          "first_token": 0.1})


def test_poisson_rate_and_gamma_burstiness():
    n, rate = 20000, 5.0
    poisson = np.diff([0.0] + arrival_offsets(n, ArrivalSpec(rate=rate, seed=1)))
    assert np.mean(poisson) == pytest.approx(1 / rate, rel=0.03)
    # exponential gaps: coefficient of variation 1
    assert np.std(poisson) / np.mean(poisson) == pytest.approx(1.0, rel=0.05)
    bursty = np.diff([0.0] + arrival_offsets(n, ArrivalSpec(rate=rate, burstiness=0.25, seed=1)))
    assert np.mean(bursty) == pytest.approx(1 / rate, rel=0.05)  # same mean rate
    # gamma shape k: CV = 1 / sqrt(k) = 2
    assert np.std(bursty) / np.mean(bursty) == pytest.approx(2.0, rel=0.1)
    even = np.diff([0.0] + arrival_offsets(n, ArrivalSpec(rate=rate, burstiness=4.0, seed=1)))
    assert np.std(even) / np.mean(even) == pytest.approx(0.5, rel=0.05)
    assert arrival_offsets(3, ArrivalSpec()) == [0.0, 0.0, 0.0]
    seeded = ArrivalSpec(rate=2, seed=7)
    assert arrival_offsets(5, seeded) == arrival_offsets(5, seeded)
    for bad in (dict(rate=0), dict(burstiness=0), dict(concurrency=0)):
        with pytest.raises(ValueError):
            ArrivalSpec(**bad)


def test_length_distributions():
    assert parse_length_dist("128") == LengthDist("fixed", (128.0,), 128, 128)
    u = parse_length_dist("uniform:4:8")
    rng = np.random.default_rng(0)
    xs = u.sample(2000, rng)
    assert min(xs) == 4 and max(xs) == 8
    n = parse_length_dist("normal:100:30:80:120")
    xs = n.sample(2000, rng)
    assert min(xs) == 80 and max(xs) == 120
    assert (n.low, n.high) == (80, 120)
    ln = parse_length_dist("lognormal:4:0.5")
    xs = ln.sample(5000, rng)
    assert np.median(xs) == pytest.approx(math.exp(4), rel=0.05)
    assert (ln.low, ln.high) == (1, math.ceil(100 * math.exp(4)))
    for bad in ("zipf:3", "uniform:8:4", "normal:10", "fixed:0", "uniform:a:b"):
        with pytest.raises(DatasetError):
            parse_length_dist(bad)
    reqs = synthetic_requests(5, parse_length_dist("uniform:3:6"), parse_length_dist("7"), seed=3,
                              token_range=(10, 20))
    assert [len(r.prompt) for r in reqs] == [r.prompt_len for r in reqs]
    assert all(10 <= t < 20 for r in reqs for t in r.prompt)
    assert {r.output_len for r in reqs} == {7}
    assert reqs == synthetic_requests(5, parse_length_dist("uniform:3:6"), parse_length_dist("7"),
                                      seed=3, token_range=(10, 20))


def sharegpt(path, convs):
    path.write_text(json.dumps([{"id": str(i), "conversations": c} for i, c in enumerate(convs)]))
    return path


def turn(who, text):
    return {"from": who, "value": text}


def test_sharegpt_parsing(tmp_path):
    convs = [
        [turn("human", "a" * 40), turn("gpt", "b" * 80)],  # 10 / 20 tokens (4 chars each)
        [turn("human", "hi")],  # one turn: skipped
        [turn("human", "x" * 8), turn("gpt", "y" * 40)],  # prompt of 2 tokens: skipped
        [turn("human", "c" * 400), turn("gpt", "d" * 60)],  # 100 / 15 tokens
        [turn("human", "e" * 4000), turn("gpt", "f" * 40)],  # prompt over 512: skipped
    ]
    path = sharegpt(tmp_path / "sg.json", convs)
    got = load_sharegpt(path, 2, seed=0, max_prompt_len=512)
    assert sorted((r.prompt_len, r.output_len) for r in got) == [(10, 20), (100, 15)]
    assert sorted(r.prompt for r in got) == ["a" * 40, "c" * 400]
    # a tokenizer that counts characters: the 8-character prompt now passes the filter
    chars = load_sharegpt(path, 3, count_tokens=len, output_len=9, max_prompt_len=512)
    assert sorted((r.prompt_len, r.output_len) for r in chars) == [(8, 9), (40, 9), (400, 9)]
    with pytest.raises(DatasetError, match="only 2 usable"):
        load_sharegpt(path, 3, max_prompt_len=512)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read"):
        load_sharegpt(tmp_path / "bad.json", 1)


def test_rates_table_and_record(tmp_path):
    assert parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("", "1,x", "0,1"):
        with pytest.raises(ValueError):
            parse_rates(bad)
    # a load step: one count per rate
    assert parse_counts("10,60", 2) == [10, 60] and parse_counts(40, 3) == [40, 40, 40]
    for bad in ("10,20", "0", "x", "5,,"):
        with pytest.raises(ValueError, match="num-requests"):
            parse_counts(bad, 3)
    s = compute_stats(RECORDS, 10.0, 0.5, 0.2)
    point = SweepPoint(ArrivalSpec(rate=2.0), s,
                       RunResult(RECORDS, 10.0, ArrivalSpec(rate=2.0), 1.7e9))
    text = format_table({"2 req/s": s})
    assert "requests ok / failed" in text and "3 / 1" in text
    assert "500.0 / 300.0 / 860.0 / 986.0" in text  # TTFT mean / p50 / p90 / p99 in ms
    rec_ = record({"run": [point]}, {"model": "m"})
    path = tmp_path / "r.json"
    write_json(path, rec_)
    back = json.loads(path.read_text())
    run = back["runs"][0]
    assert run["rate"] == 2.0 and run["stats"]["completed"] == 3 and run["started_at"] == 1.7e9
    assert run["stats"]["phases"]["queue"] is None  # NaN written as null
    assert [r["error"] for r in run["requests"]] == [None, None, None, "HTTP 503: no replica"]
    assert run["requests"][1]["ttft"] == pytest.approx(1.0)


# -- the server's recorder measures what the bench measures ------------------------
def exported(model: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    from splitserve.cluster.observability.metrics import render_prometheus

    out = {}
    for fam in text_string_to_metric_families(render_prometheus().decode()):
        for s in fam.samples:
            if s.labels.get("model") == model and not s.name.endswith("_created"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model"))
                out[(s.name, labels)] = s.value
    return out


def test_request_recorder_matches_bench_definitions():
    """One request timeline through ``RequestRecorder`` (what ClusterBackend
    records, here into the process registry: no Ray) and through the bench's
    statistics gives the same TTFT, TPOT, ITL, E2E and phases."""
    from splitserve.cluster.api.backend import Overloaded
    from splitserve.cluster.observability.metrics import RequestRecorder

    now = [10.0]
    rec = RequestRecorder("rec-a", clock=lambda: now[0])
    outputs = [(10.4, [5], REMOTE), (10.5, [6], None), (10.75, [7, 8], None), (11.0, [9], None)]
    for t, ids, timings in outputs:
        now[0] = t
        rec.on_output({"token_ids": ids, "finished": t == 11.0, "timings": timings,
                       "prompt_tokens": 12, "cached_tokens": 8,
                       "finish_reason": "length" if t == 11.0 else None})
    rec.finish()
    bench = RequestRecord(0, 4, 5, send_time=10.0, chunk_times=[10.4, 10.5, 10.75, 11.0],
                          output_tokens=5, timings=REMOTE)
    s = compute_stats([bench], 1.0, 10, 10)
    got = exported("rec-a")
    assert got[("splitserve_ttft_seconds_sum", ())] == pytest.approx(bench.ttft) == 0.4
    assert got[("splitserve_e2e_seconds_sum", ())] == pytest.approx(bench.e2e) == 1.0
    assert got[("splitserve_tpot_seconds_sum", ())] == pytest.approx(bench.tpot) == 0.15
    assert got[("splitserve_itl_seconds_count", ())] == 3
    assert got[("splitserve_itl_seconds_sum", ())] == pytest.approx(sum(bench.itls()))
    for phase, secs in s.phases.items():
        assert got[("splitserve_request_phase_seconds_sum", (("phase", phase),))] == \
            pytest.approx(secs)
    assert got[("splitserve_output_tokens_total", ())] == 5
    assert got[("splitserve_requests_total", (("outcome", "finished"),))] == 1
    assert got[("splitserve_handoff_bytes_total", ())] == 4096
    assert got[("splitserve_finished_requests_total", (("finish_reason", "length"),))] == 1
    assert got[("splitserve_prompt_tokens_total", ())] == 12
    assert got[("splitserve_cached_prompt_tokens_total", ())] == 8
    assert got[("splitserve_request_prompt_tokens_sum", ())] == 12
    assert got[("splitserve_request_output_tokens_sum", ())] == 5
    # a refusal before any token, and a client that went away
    refused = RequestRecorder("rec-b")
    refused.finish(Overloaded("queues full", 1.0))
    gone = RequestRecorder("rec-b")
    gone.on_output({"token_ids": [1], "finished": False, "timings": {
        "mode": "local", "ttft_s": 0.1, "fallback_reason": "prefill replica unavailable"}})
    gone.finish(GeneratorExit())
    got = exported("rec-b")
    assert got[("splitserve_refusals_total", (("reason", "overloaded"),))] == 1
    assert got[("splitserve_requests_total", (("outcome", "refused"),))] == 1
    assert got[("splitserve_requests_total", (("outcome", "cancelled"),))] == 1
    assert got[("splitserve_fallbacks_total", ())] == 1
    assert ("splitserve_ttft_seconds_count", ()) not in got  # unfinished: no latency recorded


def test_worker_router_and_autoscaler_recording():
    from splitserve.cluster.observability.metrics import (
        RouterMetrics,
        decision_labels,
        record_autoscaler_decision,
        record_worker_metrics,
    )
    from splitserve.engine.roles import Role
    from splitserve.router.core import RouterCore
    from splitserve.router.reports import ReplicaInfo
    from splitserve.router.config import ModelFacts, RouterConfig
    from splitserve.router.types import DecodeReplicaStats, PrefillReplicaStats
    from tests.fixtures.worker_stats import decode_stats, engine_load

    base = dict(free_blocks=30, total_blocks=40, running=2, waiting=1, pending_prompt_tokens=17,
                preemptions=3, prefix_hits=1, prefix_queries=4)
    record_worker_metrics(Role.DECODE, "w", decode_stats(engine_load(**base), fallbacks=1))
    record_worker_metrics(Role.DECODE, "w", decode_stats(
        engine_load(**{**base, "preemptions": 5, "free_blocks": 10}), fallbacks=1))
    got = exported("w")
    d = (("role", "decode"),)
    assert got[("splitserve_kv_cache_usage_ratio", d)] == 0.75
    assert got[("splitserve_kv_cache_blocks", d)] == 40
    assert got[("splitserve_pending_prompt_tokens", d)] == 17
    assert got[("splitserve_running_seqs", d)] == 2
    assert got[("splitserve_prefix_cache_queries_total", d)] == 4
    assert got[("splitserve_prefix_cache_hits_total", d)] == 1
    assert got[("splitserve_preemptions_total", d)] == 5  # cumulative totals, counted once
    assert got[("splitserve_replica_fallbacks_total", d)] == 1
    assert ("splitserve_replica_refusals_total", d) not in got

    facts = ModelFacts(block_size=4, kv_bytes_per_token=1024)
    core = RouterCore(RouterConfig(models={"r": facts}), clock=lambda: 5.0)
    core.update_stats(PrefillReplicaStats(replica_id="p1", model="r", pending_prompt_tokens=0,
                                          running_requests=0, prefill_tokens_per_s=0,
                                          updated_at=5.0))
    for rid in ("c1", "c2"):
        core.update_stats(DecodeReplicaStats(
            replica_id=rid, model="r", free_blocks=8, total_blocks=8, running_seqs=0, max_seqs=4,
            block_size=4, waiting_requests=0, decode_step_s=0.01, prefill_tokens_per_s=0,
            updated_at=5.0))
    core.admit("r")
    rm = RouterMetrics(period_s=60.0, clock=lambda: 0.0)
    info = {rid: ReplicaInfo(replica_id=rid, role=role, model="r", kv_endpoint="", node_id="")
            for rid, role in (("p1", Role.PREFILL), ("c1", Role.COLOCATED),
                              ("c2", Role.COLOCATED))}
    rm.publish(core, info)
    rm.on_placement("r", "least_loaded")
    rm.on_rejection("r", "overloaded")
    got = exported("r")
    assert got[("splitserve_pool_replicas", (("pool", "prefill"),))] == 1
    assert got[("splitserve_pool_replicas", (("pool", "colocated"),))] == 2
    assert got[("splitserve_router_in_flight", ())] == 1
    assert got[("splitserve_router_decisions_total", (("reason", "least_loaded"),))] == 1
    assert got[("splitserve_router_rejections_total", (("reason", "overloaded"),))] == 1
    core.remove_replica("p1")
    rm.publish(core, info, force=True)
    assert exported("r")[("splitserve_pool_replicas", (("pool", "prefill"),))] == 0

    rec = DecisionRecord(app="a-prefill", model="a", role="prefill", bottleneck="compute",
                         time=0.0, running=2, current=2, target=2, desired=3, value=1.4,
                         reason="scale up to 3 in 4.0s if it persists: ...", min=1, max=4,
                         changed=False, prefer_local_prefill=None)
    assert decision_labels(rec) == {"bottleneck": "compute", "decision": "hold",
                                    "reason": "delayed"}
    assert decision_labels(msgspec.structs.replace(rec, target=3))["reason"] == "scaled"
    assert decision_labels(msgspec.structs.replace(rec, value=None, desired=2))["reason"] == \
        "no_metrics"
    assert decision_labels(msgspec.structs.replace(rec, desired=2))["reason"] == "on_target"
    record_autoscaler_decision(rec)
    record_autoscaler_decision(msgspec.structs.replace(rec, target=3))
    got = exported("a")

    def last(decision, reason):
        labels = {"bottleneck": "compute", "pool": "prefill", "decision": decision,
                  "reason": reason}
        return got[("splitserve_autoscaler_last_decision", tuple(sorted(labels.items())))]
    assert last("hold", "delayed") == 0 and last("up", "scaled") == 1  # one series reads 1
    assert got[("splitserve_autoscaler_target_replicas", (("pool", "prefill"),))] == 3
