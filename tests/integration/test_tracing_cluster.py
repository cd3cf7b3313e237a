"""One request's trace through a live local Ray cluster (disaggregated: one
prefill and one decode replica): every process exports its spans over OTLP
to a real collector on loopback, and they join the client's trace with the
right parents."""


import grpc
import pytest
from openai import OpenAI

from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.config import parse_config
from splitserve.cluster.serve import app
from tests.fixtures.otlp_collector import Collector
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port

KEY = "sk-trace-test"
TRACE = "5b8efff798038103d269b633813fc60c"
CLIENT_SPAN = "eee19b7ec3c1b174"
PHASES = {"ingress", "route", "router.place", "decode", "handoff.receive", "prefill",
          "handoff.send"}


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    with Collector() as collector:
        cfg = parse_config({
            "models": [{"model": {"name": "tiny", "path": str(tiny_llama), "num_blocks": 64,
                                  "block_size": 4},
                        "prefill": pool, "decode": pool}],
            "router": {"local_prefill_max_tokens": 0},  # every prompt goes to the prefill pool
            "auth": {"api_keys": [KEY], "cluster_token": "trace-token"},
            "endpoints": {"http_port": free_port(), "grpc_port": free_port()},
            "observability": {"tracing": {"endpoint": collector.endpoint,
                                          "schedule_delay_ms": 50, "service_name": "traced"}},
        })
        with local_ray(num_cpus=4):
            app.deploy(cfg, wait_s=240)
            try:
                yield cfg, collector
            finally:
                app.shutdown()


def in_trace(trace_id: str, names: set[str]):
    return lambda spans: names <= {s.name for s in spans if s.trace_id == trace_id}


@pytest.mark.slow
def test_one_http_request_is_one_trace_across_four_processes(cluster):
    cfg, collector = cluster
    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.endpoints.http_port}/v1", api_key=KEY,
                    max_retries=0)
    out = client.completions.create(
        model="tiny", prompt="the quick brown fox jumps", max_tokens=5, temperature=0,
        extra_headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01",
                       "x-splitserve-timings": "1"})
    assert out.usage.completion_tokens == 5
    assert out.model_extra["splitserve_timings"]["ingress_ttft_s"] > 0  # the header still works
    spans = [s for s in collector.wait_for(in_trace(TRACE, PHASES), timeout_s=60)
             if s.trace_id == TRACE]
    got = {s.name: s for s in spans}
    assert sorted(s.name for s in spans) == sorted(PHASES)  # one of each: no retry, no queue
    parent_of = {name: got[name].parent_id for name in PHASES}
    assert parent_of == {
        "ingress": CLIENT_SPAN,
        "route": got["ingress"].span_id,
        "router.place": got["route"].span_id,
        "decode": got["ingress"].span_id,
        "handoff.receive": got["decode"].span_id,
        "prefill": got["handoff.receive"].span_id,
        "handoff.send": got["prefill"].span_id,
    }
    role = {name: got[name].resource["splitserve.role"] for name in PHASES}
    assert role == {"ingress": "ingress", "route": "ingress", "router.place": "router",
                    "decode": "decode", "handoff.receive": "decode", "prefill": "prefill",
                    "handoff.send": "prefill"}
    pids = {r: {got[n].resource["process.pid"] for n in PHASES if role[n] == r}
            for r in set(role.values())}
    assert all(len(p) == 1 for p in pids.values())
    assert len(set.union(*pids.values())) == 4  # ingress, router, prefill, decode
    assert all(s.resource["service.name"] == "traced" for s in spans)

    ingress = got["ingress"].attributes
    assert ingress["splitserve.api"] == "http" and ingress["http.route"] == "/v1/completions"
    assert ingress["http.response.status_code"] == 200
    assert ingress["gen_ai.request.model"] == "tiny"
    assert ingress["splitserve.request_id"] == out.id
    assert ingress["gen_ai.usage.input_tokens"] == out.usage.prompt_tokens
    assert ingress["gen_ai.usage.output_tokens"] == 5
    assert ingress["gen_ai.response.finish_reasons"] == ["length"]
    # the body came in from Serve's proxy after the span started, before placement began
    assert [e[0] for e in got["ingress"].events] == ["body_read"]
    assert got["ingress"].start_ns <= got["ingress"].event_ns["body_read"] <= got["route"].start_ns
    # the placement the router made is where the work ran
    route, place = got["route"].attributes, got["router.place"].attributes
    decode_id = got["decode"].attributes["splitserve.replica_id"]
    prefill_id = got["prefill"].attributes["splitserve.replica_id"]
    assert route["splitserve.decode_replica"] == place["splitserve.decode_replica"] == decode_id
    assert route["splitserve.prefill_replica"] == place["splitserve.prefill_replica"] == prefill_id
    assert got["handoff.receive"].attributes["splitserve.prefill_replica"] == prefill_id
    for name in ("decode", "prefill", "handoff.receive"):
        assert got[name].attributes["splitserve.transport"] == "grpc"
        assert got[name].attributes["gen_ai.request.model"] == "tiny"
    kv = got["handoff.send"].attributes["splitserve.kv_bytes"]
    assert kv > 0 and got["handoff.receive"].attributes["splitserve.kv_bytes"] == kv
    assert got["decode"].attributes["gen_ai.usage.output_tokens"] == 5
    assert got["decode"].attributes["splitserve.prefill_mode"] == "remote"
    assert all(s.status == 0 for s in spans)


@pytest.mark.slow
def test_grpc_metadata_traceparent_and_a_refusal(cluster):
    cfg, collector = cluster
    trace = "6c8efff798038103d269b633813fc60d"
    md = [("authorization", f"Bearer {KEY}"), ("traceparent", f"00-{trace}-{CLIENT_SPAN}-01")]
    with grpc.insecure_channel(f"127.0.0.1:{cfg.endpoints.grpc_port}") as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(model="tiny", text="hello there",
                                 params=pb.SamplingParams(max_tokens=3, temperature=0.0))
        resps = list(stub.Generate(req, metadata=md, timeout=60))
        assert sum(len(r.token_ids) for r in resps) == 3
        bad = pb.GenerateRequest(model="tiny", text="hello",
                                 params=pb.SamplingParams(max_tokens=3, temperature=-1.0))
        bad_trace = "7d8efff798038103d269b633813fc60e"
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(bad, timeout=30, metadata=[
                md[0], ("traceparent", f"00-{bad_trace}-{CLIENT_SPAN}-01")]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    spans = collector.wait_for(in_trace(trace, {"ingress", "decode", "prefill"}), timeout_s=60)
    ingress = next(s for s in spans if s.trace_id == trace and s.name == "ingress")
    decode = next(s for s in spans if s.trace_id == trace and s.name == "decode")
    assert ingress.parent_id == CLIENT_SPAN and decode.parent_id == ingress.span_id
    assert ingress.attributes["splitserve.api"] == "grpc"
    assert ingress.attributes["gen_ai.usage.output_tokens"] == 3
    # the refused request: its ingress span alone, with the status, not marked failed
    refused = collector.wait_for(in_trace(bad_trace, {"ingress"}), timeout_s=30)
    refused = [s for s in refused if s.trace_id == bad_trace]
    assert [s.name for s in refused] == ["ingress"]
    assert refused[0].attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused[0].status == 0
