"""A running cluster's workload from its /metrics: rates and lengths from the
deltas of two scrapes, served by a real Prometheus HTTP exporter on
127.0.0.1 with the cluster's own metric names and buckets, and
``splitserve plan --observed URL`` end to end."""

import json
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from splitserve.cluster.cli.main import main
from splitserve.cluster.observability.metric_defs import TOKEN_COUNT_BUCKETS
from splitserve.cluster.planning.observed import parse_metrics, scrape, workload_from_scrapes
from splitserve.cluster.planning.planner.inputs import PlanInputError
from tests.unit.test_planner_cli import SMALL


class FakeIngressMetrics:
    """The three metrics the planner reads, under the names and buckets the
    ingress exports, in a registry of their own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("splitserve_requests", "ended", ("model", "outcome"),
                                registry=self.registry)
        self.prompt = Histogram("splitserve_request_prompt_tokens", "prompt", ("model",),
                                buckets=TOKEN_COUNT_BUCKETS, registry=self.registry)
        self.output = Histogram("splitserve_request_output_tokens", "output", ("model",),
                                buckets=TOKEN_COUNT_BUCKETS, registry=self.registry)

    def finish(self, model, prompt_len, output_len):
        self.requests.labels(model, "finished").inc()
        self.prompt.labels(model).observe(prompt_len)
        self.output.labels(model).observe(output_len)

    def text(self):
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


@pytest.fixture
def exporter():
    m = FakeIngressMetrics()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=m.registry)
    yield m, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


def test_rate_and_lengths_come_from_the_deltas(exporter):
    m, url = exporter
    rng = np.random.default_rng(3)
    for _ in range(50):  # before the window: must not count
        m.finish("chat", 5000, 2)
    before = scrape(url)
    ins = rng.integers(300, 900, 400)
    outs = rng.integers(20, 60, 400)
    for a, b in zip(ins, outs):
        m.finish("chat", int(a), int(b))
    m.requests.labels("chat", "refused").inc(40)  # arrivals that ended without output
    m.finish("other", 10, 10)
    after = scrape(url)
    after.time = before.time + 20.0  # 440 requests of chat ended in 20 s
    wl, model = workload_from_scrapes(before, after, "chat", window=200, seed=0)
    assert model == "chat"
    assert wl.mean_rate == pytest.approx(22.0, rel=0.1)  # Poisson arrivals at 440 / 20 s
    assert wl.inputs.mean() == pytest.approx(ins.mean(), rel=0.02)
    assert wl.outputs.mean() == pytest.approx(outs.mean(), rel=0.02)
    # every length lies in a bucket the window's requests filled: (200, 500] or (500, 1000]
    assert wl.inputs.min() >= 201 and wl.inputs.max() <= 1000
    assert wl.outputs.min() >= 11 and wl.outputs.max() <= 100
    assert len(wl.sim_requests) == 200
    assert "440 requests in 20 s" in wl.description


def test_the_only_busy_model_is_chosen_and_ambiguity_is_an_error():
    m = FakeIngressMetrics()
    before = parse_metrics(m.text(), 0.0)
    m.finish("a", 100, 10)
    m.finish("a", 120, 12)
    m.requests.labels("b", "finished").inc(0)  # known but idle
    after = parse_metrics(m.text(), 10.0)
    assert workload_from_scrapes(before, after, None, window=50)[1] == "a"
    m.finish("b", 10, 1)
    m.finish("b", 10, 1)
    after = parse_metrics(m.text(), 20.0)
    with pytest.raises(PlanInputError, match="several models .*--observed-model"):
        workload_from_scrapes(before, after, None, window=50)
    with pytest.raises(PlanInputError, match="no request ended"):
        workload_from_scrapes(after, parse_metrics(m.text(), 30.0), None, window=50)
    with pytest.raises(PlanInputError, match="second scrape must come after"):
        workload_from_scrapes(after, before, "a", window=50)


def test_scrape_errors_name_the_problem(exporter):
    with pytest.raises(PlanInputError, match="cannot scrape the metrics"):
        scrape("http://127.0.0.1:1", timeout_s=2)
    with pytest.raises(PlanInputError, match="not Prometheus text"):
        parse_metrics("splitserve_requests_total{model=\"a\" 1\n", 0.0)


def test_plan_observes_a_running_exporter(exporter, tmp_path, capsys):
    m, url = exporter
    rng = np.random.default_rng(1)
    stop = threading.Event()

    def traffic():  # ~10 req/s while the planner observes
        while not stop.wait(0.1):
            m.finish("chat", int(rng.integers(500, 2000)), int(rng.integers(50, 200)))

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        rc = main(["plan", "--shape", "llama-3.1-8b", "--hardware", "l40s:3", "--observed", url,
                   "--observed-window", "2.0", "--ttft", "400ms@p90", "--tpot", "80ms@p90",
                   "--db", str(tmp_path / "p.db"), "--out", str(tmp_path / "out")] + SMALL)
    finally:
        stop.set()
        t.join(5)
    text = capsys.readouterr().out
    assert rc == 0, text
    rec = json.loads((tmp_path / "out" / "plan.json").read_text())
    wl = rec["workload"]
    assert wl["description"].startswith("observed 'chat'")
    assert 3 < wl["mean_rate"] < 15
    assert 500 < wl["input_mean"] < 2000 and 50 < wl["output_mean"] < 200


class FakeRayNodeMetrics:
    """One node's Ray metrics endpoint: the ingress metrics under Ray's names
    (``ray_`` prefix), one series per process on the node (``WorkerId``)."""

    def __init__(self, node: str):
        self.node = node
        self.registry = CollectorRegistry()
        labels = ("model", "outcome", "WorkerId", "NodeAddress")
        self.requests = Counter("ray_splitserve_requests", "ended", labels, registry=self.registry)
        self.prompt = Histogram("ray_splitserve_request_prompt_tokens", "prompt",
                                ("model", "WorkerId", "NodeAddress"),
                                buckets=TOKEN_COUNT_BUCKETS, registry=self.registry)
        self.output = Histogram("ray_splitserve_request_output_tokens", "output",
                                ("model", "WorkerId", "NodeAddress"),
                                buckets=TOKEN_COUNT_BUCKETS, registry=self.registry)

    def finish(self, worker, model, prompt_len, output_len):
        self.requests.labels(model, "finished", worker, self.node).inc()
        self.prompt.labels(model, worker, self.node).observe(prompt_len)
        self.output.labels(model, worker, self.node).observe(output_len)


@pytest.fixture
def two_nodes():
    nodes, servers = [], []
    for name in ("10.0.0.1", "10.0.0.2"):
        m = FakeRayNodeMetrics(name)
        server, thread = start_http_server(0, addr="127.0.0.1", registry=m.registry)
        nodes.append((m, f"http://127.0.0.1:{server.server_port}"))
        servers.append((server, thread))
    yield nodes
    for server, thread in servers:
        server.shutdown()
        thread.join(5)


def test_every_nodes_endpoint_is_summed(two_nodes):
    """Three ingress replicas (two on the first node): each node's endpoint
    counts its replicas' requests only; the sum of the endpoints is the
    cluster's traffic, which one endpoint alone undercounts."""
    from splitserve.cluster.planning.observed import scrape_all

    (n1, u1), (n2, u2) = two_nodes
    n1.finish("w-a", "chat", 4000, 5)  # before the window
    before, before_1 = scrape_all([u1, u2]), scrape(u1)
    rng = np.random.default_rng(5)
    lens = []
    for k in range(300):  # spread over the replicas as Serve's proxy would
        node, worker = [(n1, "w-a"), (n1, "w-b"), (n2, "w-c")][k % 3]
        a, b = int(rng.integers(300, 900)), int(rng.integers(20, 60))
        node.finish(worker, "chat", a, b)
        lens.append((a, b))
    after, after_1 = scrape_all([u1, u2]), scrape(u1)
    after.time = before.time + 10.0  # 300 requests in 10 s
    after_1.time = before_1.time + 10.0
    wl, _ = workload_from_scrapes(before, after, "chat", window=200, seed=0)
    assert wl.mean_rate == pytest.approx(30.0, rel=0.1)
    ins, outs = np.array(lens).T
    assert wl.inputs.mean() == pytest.approx(ins.mean(), rel=0.05)
    assert wl.outputs.mean() == pytest.approx(outs.mean(), rel=0.05)
    assert "300 requests in 10 s" in wl.description
    # the first node alone: its two replicas' requests, two thirds of the traffic
    one, _ = workload_from_scrapes(before_1, after_1, "chat", window=50)
    assert "200 requests in 10 s" in one.description
    with pytest.raises(PlanInputError, match="given twice"):
        scrape_all([u1, u1 + "/"])


def test_plan_sums_several_observed_endpoints(two_nodes, tmp_path, capsys):
    (n1, u1), (n2, u2) = two_nodes
    stop = threading.Event()

    def traffic():  # ~10 req/s on each node while the planner observes
        rng = np.random.default_rng(2)
        while not stop.wait(0.1):
            for node, worker in ((n1, "w-a"), (n2, "w-c")):
                node.finish(worker, "chat", int(rng.integers(500, 2000)),
                            int(rng.integers(50, 200)))

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        rc = main(["plan", "--shape", "llama-3.1-8b", "--hardware", "l40s:3", "--observed", u1,
                   "--observed", u2, "--observed-window", "2.0", "--ttft", "400ms@p90",
                   "--tpot", "80ms@p90", "--db", str(tmp_path / "p.db"),
                   "--out", str(tmp_path / "out")] + SMALL)
    finally:
        stop.set()
        t.join(5)
    text = capsys.readouterr().out
    assert rc == 0, text
    wl = json.loads((tmp_path / "out" / "plan.json").read_text())["workload"]
    assert 10 < wl["mean_rate"] < 30  # both nodes' traffic, ~20 req/s
    # summing is for metrics endpoints: a bench record among them is refused
    rc = main(["plan", "--shape", "llama-3.1-8b", "--observed", u1,
               "--observed", str(tmp_path / "bench.json"), "--db", str(tmp_path / "p.db")])
    assert rc == 2
    assert "URLs only" in capsys.readouterr().err
