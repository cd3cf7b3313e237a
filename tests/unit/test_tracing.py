"""The tracing module against a real OTLP/gRPC collector on loopback: the
real exporter, spans, their names and parent links, sampling, headers,
TLS, configuration from the operator file and from the environment."""

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.cluster.config import TracingSpec, parse_config
from splitserve.cluster.config.base import ConfigError
from splitserve.cluster.observability.tracing import (TracingUnavailableError, check_installed,
                                                      export_settings, start_tracer)
from splitserve.handoff.tracing import ATTR_MODEL, ATTR_REQUEST_ID
from tests.fixtures.otlp_collector import Collector

ROOT = Path(__file__).resolve().parents[2]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def collector():
    with Collector() as c:
        yield c


def _spec(endpoint: str, **kw) -> TracingSpec:
    return TracingSpec(endpoint=endpoint, schedule_delay_ms=20, timeout_s=5, **kw)


def by_name(spans):
    return {s.name: s for s in spans}


def test_off_without_an_endpoint():
    assert start_tracer(None, "ingress", environ={}) is None
    assert start_tracer(TracingSpec(), "ingress", environ={}) is None
    assert export_settings(None, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": ""}) is None


@pytest.mark.slow  # a fresh interpreter imports the whole cluster (about 5 s)
def test_an_untraced_process_loads_no_exporter():
    # an untraced process loads neither the SDK nor the exporter. FastAPI
    # imports opentelemetry's API package itself and Ray Serve its SDK, so
    # the modules free of Serve are checked first, then the Serve wiring for
    # the exporter and our own OpenTelemetry module.
    code = ("import sys\n"
            "def loaded(prefixes): return [m for m in sys.modules if m.startswith(prefixes)]\n"
            "import splitserve.cluster.serve.orchestrator, splitserve.cluster.api.openai_api\n"
            "import splitserve.cluster.api.grpc_api, splitserve.prefill.worker\n"
            "import splitserve.decode.worker\n"
            "from splitserve.cluster.observability.tracing import start_tracer\n"
            "assert start_tracer(None, 'decode', environ={}) is None\n"
            "print(loaded(('opentelemetry.sdk', 'opentelemetry.exporter')))\n"
            "import splitserve.cluster.serve.workers, splitserve.cluster.serve.router_actor\n"
            "import splitserve.cluster.serve.ingress\n"
            "print(loaded(('opentelemetry.exporter', 'splitserve.cluster.observability.otel')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "[]"]


def test_spans_of_two_processes_join_the_client_trace(collector):
    ingress = start_tracer(_spec(collector.endpoint), "ingress", environ={})
    decode = start_tracer(_spec(collector.endpoint), "decode", environ={})
    decode.common["splitserve.replica_id"] = "127.0.0.1:7001"
    try:
        root = ingress.start("ingress", CLIENT_PARENT, server=True,
                             attributes={ATTR_MODEL: "tiny"})
        root.set(ATTR_REQUEST_ID, "cmpl-1")
        root.add("gen_ai.usage.output_tokens", 3)
        root.add("gen_ai.usage.output_tokens", 4)
        child = decode.start("decode", root.traceparent, server=True)
        child.event("first_token", ttft_s=0.25)
        child.fail(RuntimeError("engine broke"))
        child.end()
        child.end()  # idempotent
        root.end()
    finally:
        decode.shutdown()
        ingress.shutdown()
    spans = collector.wait_for(lambda s: len(s) >= 2)
    assert len(spans) == 2
    got = by_name(spans)
    r, c = got["ingress"], got["decode"]
    assert r.trace_id == c.trace_id == CLIENT_TRACE
    assert r.parent_id == "00f067aa0ba902b7"  # the client's span
    assert c.parent_id == r.span_id
    assert (r.kind, c.kind) == ("server", "server")
    assert r.attributes == {ATTR_MODEL: "tiny", ATTR_REQUEST_ID: "cmpl-1",
                            "gen_ai.usage.output_tokens": 7}
    assert c.attributes["splitserve.replica_id"] == "127.0.0.1:7001"
    assert c.attributes["error.type"] == "RuntimeError"
    assert c.status == 2 and r.status == 0
    assert [e[0] for e in c.events] == ["first_token", "exception"]
    assert c.events[0][1] == {"ttft_s": 0.25}
    assert c.events[1][1]["exception.message"] == "engine broke"
    assert r.resource["splitserve.role"] == "ingress" and c.resource["splitserve.role"] == "decode"
    assert r.resource["service.name"] == "splitserve"


def test_a_malformed_traceparent_starts_a_new_trace(collector):
    t = start_tracer(_spec(collector.endpoint), "ingress", environ={})
    try:
        t.start("ingress", "00-not-a-trace-01", server=True).end()
        t.start("ingress", None, server=True).end()
    finally:
        t.shutdown()
    spans = collector.wait_for(lambda s: len(s) >= 2)
    assert [s.parent_id for s in spans] == ["", ""]
    assert spans[0].trace_id != spans[1].trace_id != CLIENT_TRACE


def test_sampling_follows_the_parent_then_the_ratio(collector):
    t = start_tracer(_spec(collector.endpoint, sample_ratio=0.0), "ingress", environ={})
    try:
        unsampled = t.start("ingress", None)  # a new trace at ratio 0: dropped
        child = t.start("decode", unsampled.traceparent)  # follows its parent: dropped
        assert int(unsampled.traceparent[-2:], 16) & 1 == 0  # the sampled flag is off
        assert not child.recording
        child.end()
        unsampled.end()
        t.start("kept", CLIENT_PARENT).end()  # the client sampled it
        t.start("dropped", CLIENT_PARENT[:-2] + "00").end()  # the client did not
    finally:
        t.shutdown()
    spans = collector.wait_for(lambda s: len(s) >= 1)
    assert [s.name for s in spans] == ["kept"]


def test_shutdown_exports_what_the_batch_still_holds(collector):
    spec = TracingSpec(endpoint=collector.endpoint, schedule_delay_ms=60_000, timeout_s=5)
    t = start_tracer(spec, "prefill", environ={})
    t.start("prefill", None).end()
    assert collector.spans == []  # waits for its batch
    t.shutdown()
    assert [s.name for s in collector.spans] == ["prefill"]


def test_headers_from_the_config_and_a_node_variable(collector):
    spec = _spec(collector.endpoint, headers={"x-tenant": "team-a"}, headers_env="TRACE_AUTH")
    with pytest.raises(TracingUnavailableError, match=r"\$TRACE_AUTH is not set"):
        start_tracer(spec, "router", environ={})
    t = start_tracer(spec, "router", environ={"TRACE_AUTH": "authorization=Bearer%20s3cret"})
    try:
        t.start("router.place", None).end()
    finally:
        t.shutdown()
    collector.wait_for(lambda s: len(s) >= 1)
    md = collector.metadata[0]
    assert md["x-tenant"] == "team-a" and md["authorization"] == "Bearer s3cret"


def test_the_environment_alone_turns_tracing_on(collector):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
    settings = export_settings(None, env)
    assert settings.endpoint == collector.endpoint and settings.sample_ratio == 1.0
    # the traces-specific variable wins
    assert export_settings(None, {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:1"}
                           ).endpoint == "http://x:1"
    t = start_tracer(None, "decode", environ=env)
    try:
        t.start("decode", None).end()
    finally:
        t.shutdown()
    assert [s.name for s in collector.wait_for(lambda s: len(s) >= 1)] == ["decode"]


def _self_signed_ip(ip: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collector")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


def test_tls_to_the_collector_with_a_ca_file(tmp_path):
    key, cert = _self_signed_ip("127.0.0.1")
    (tmp_path / "ca.pem").write_bytes(cert)
    with Collector(tls=(key, cert)) as c:
        assert c.endpoint.startswith("https://")
        t = start_tracer(_spec(c.endpoint, ca_file=str(tmp_path / "ca.pem")), "ingress",
                         environ={})
        try:
            t.start("ingress", None).end()
        finally:
            t.shutdown()
        assert [s.name for s in c.wait_for(lambda s: len(s) >= 1)] == ["ingress"]


def test_configured_but_not_installed_names_the_fix(monkeypatch):
    # None in sys.modules makes the import fail as a missing package does
    monkeypatch.setitem(sys.modules, "splitserve.cluster.observability.otel", None)
    with pytest.raises(TracingUnavailableError, match=r"splitserve\[tracing\]"):
        start_tracer(TracingSpec(endpoint="http://127.0.0.1:4317"), "ingress", environ={})
    # what `splitserve deploy` checks first finds the real packages here
    check_installed(None)
    check_installed(TracingSpec(endpoint="http://127.0.0.1:4317"))
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc", None)
    with pytest.raises(TracingUnavailableError, match="opentelemetry.exporter.otlp.proto.grpc"):
        check_installed(TracingSpec(endpoint="http://127.0.0.1:4317"))
    # set only by the environment: a warning, and no tracing
    assert start_tracer(None, "ingress",
                        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) is None


def test_operator_file_section():
    cfg = parse_config({"observability": {"tracing": {
        "endpoint": "https://otel:4317", "sample_ratio": 0.25, "headers_env": "OTEL_AUTH"}}})
    t = cfg.observability.tracing
    assert (t.endpoint, t.sample_ratio, t.service_name) == ("https://otel:4317", 0.25, "splitserve")
    assert parse_config({}).observability.tracing is None
    for bad in ({"sample_ratio": 1.5}, {"headers": {"Authorization": "x"}},
                {"client_cert_file": "c.pem"}, {"endpiont": "http://x:1"}):
        with pytest.raises(ConfigError, match="observability.tracing"):
            parse_config({"observability": {"tracing": bad}})
