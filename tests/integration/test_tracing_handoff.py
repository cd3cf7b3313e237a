"""Spans of the KV hand-off: a prefill and a decode worker over real gRPC on
loopback, each with its own tracer exporting to a real OTLP collector."""

import asyncio

import pytest

from splitserve.cluster.config import TracingSpec
from splitserve.cluster.observability.tracing import start_tracer
from splitserve.engine.sampling_params import SamplingParams
from splitserve.handoff.messages import PrefillMode
from tests.fixtures.otlp_collector import Collector
from tests.integration.pd_harness import make_engine, start_pd, wait_until

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE}-b7ad6b7169203331-01"


@pytest.fixture
def traced(tiny_llama):
    """(collector, start the pair with one tracer per role)."""
    with Collector() as c:
        tracers = []

        async def start(**kw):
            spec = TracingSpec(endpoint=c.endpoint, schedule_delay_ms=20, timeout_s=5)
            p, d = start_tracer(spec, "prefill", environ={}), start_tracer(spec, "decode",
                                                                           environ={})
            tracers.extend([p, d])
            return await start_pd(make_engine(tiny_llama), make_engine(tiny_llama),
                                  prefill_tracer=p, decode_tracer=d, **kw)
        try:
            yield c, start
        finally:
            for t in tracers:
                t.shutdown()


def test_a_remote_prefill_is_a_tree_of_spans_across_the_pair(traced):
    collector, start = traced

    async def main():
        pd = await start()
        try:
            toks, timings = await pd.generate([5, 6, 7, 8, 9, 10, 11], GREEDY, traceparent=PARENT)
            assert timings.mode is PrefillMode.REMOTE and len(toks) == 6
            # an untraced call (no traceparent) makes no span
            await pd.generate([1, 2, 3], GREEDY)
            assert await wait_until(pd.all_free)
            return timings
        finally:
            await pd.close()
    timings = asyncio.run(main())
    names = {"decode", "handoff.receive", "prefill", "handoff.send"}
    spans = collector.wait_for(lambda s: names <= {x.name for x in s})
    got = {s.name: s for s in spans}
    assert len(spans) == 4 and {s.trace_id for s in spans} == {TRACE}
    decode, recv, prefill, send = (got[n] for n in ("decode", "handoff.receive", "prefill",
                                                    "handoff.send"))
    assert decode.parent_id == "b7ad6b7169203331"
    assert recv.parent_id == decode.span_id
    assert prefill.parent_id == recv.span_id
    assert send.parent_id == prefill.span_id
    assert (decode.kind, prefill.kind) == ("server", "server")
    assert decode.resource["splitserve.role"] == "decode"
    assert prefill.resource["splitserve.role"] == send.resource["splitserve.role"] == "prefill"
    assert decode.attributes["gen_ai.usage.output_tokens"] == 6
    assert decode.attributes["gen_ai.usage.input_tokens"] == 7
    assert decode.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert decode.attributes["splitserve.prefill_mode"] == "remote"
    assert [e[0] for e in decode.events] == ["first_token"]
    assert [e[0] for e in recv.events] == ["reserved", "received", "committed"]
    assert recv.attributes["splitserve.kv_bytes"] == timings.bytes > 0
    assert prefill.attributes["splitserve.kv_bytes"] == send.attributes["splitserve.kv_bytes"]
    assert send.attributes["splitserve.kv_bytes"] == timings.bytes
    assert send.attributes["splitserve.chunks"] >= 1
    assert all(s.status == 0 for s in spans)
    # the phases nest in time too
    assert decode.start_ns <= recv.start_ns <= prefill.start_ns <= send.start_ns
    assert send.end_ns <= prefill.end_ns <= recv.end_ns <= decode.end_ns


def test_a_failed_handoff_is_recorded_and_the_fallback_traced(traced):
    collector, start = traced

    async def main():
        pd = await start()
        pd.prefill_addr = "127.0.0.1:1"  # nothing listens: the Prefill call fails
        try:
            toks, timings = await pd.generate([5, 6, 7, 8], GREEDY, traceparent=PARENT)
            assert timings.mode is PrefillMode.LOCAL and len(toks) == 6
        finally:
            await pd.close()
    asyncio.run(main())
    spans = collector.wait_for(lambda s: {"decode", "handoff.receive"} <= {x.name for x in s})
    got = {s.name: s for s in spans}
    assert "prefill" not in got
    recv, decode = got["handoff.receive"], got["decode"]
    assert recv.status == 2 and recv.attributes["splitserve.fallback"] == "local"
    # nothing answered: an RpcError without a worker's kind, recorded as an exception
    assert recv.attributes["error.type"] == "RpcError"
    assert [e[0] for e in recv.events] == ["reserved", "exception"]
    assert decode.status == 0 and decode.attributes["splitserve.prefill_mode"] == "local"
