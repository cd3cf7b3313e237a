"""What /metrics of the HTTP port serves: the cluster's metrics, gathered
at scrape time by the ingress, in Prometheus' text format.

  request  this ingress process's own ``PROCESS_REGISTRY`` (exact counts
           and sums of its requests)
  replica  built from each live replica's latest ``StatsReport`` as the
           router holds it (at most one stats period old), one series per
           replica (label ``replica``); counters are the replica's
           cumulative totals, so a restarted replica is a new series
  router   the router actor's own registry, fetched as text in the same
           call and parsed

Autoscaler metrics stay on Ray's exporter (``ray_splitserve_*``). With
several ingress replicas behind one address, request metrics are those of
whichever replica answered the scrape: scrape each replica, or read them
from Ray's exporter (docs/operators.md). ``vllm_names=True`` adds vLLM's
names for the same numbers (``splitserve.cluster.observability.vllm_names``).
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from splitserve.cluster.api.backend import ClusterMetrics
from splitserve.cluster.observability.metric_defs import METRICS, REPLICA_LABEL
from splitserve.cluster.observability.metrics import PROCESS_REGISTRY, replica_values
from splitserve.cluster.observability.vllm_names import vllm_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _of_source(families: Iterable[Metric], source: str) -> list[Metric]:
    """The families of ``source`` metrics (a counter's ``_created`` family,
    which prometheus_client also writes, is left out)."""
    return [f for f in families if f.name in METRICS and METRICS[f.name].source == source]


def request_families() -> list[Metric]:
    return _of_source(PROCESS_REGISTRY.collect(), "request")


def replica_families(reports) -> list[Metric]:
    """One family per replica metric, one series per report's replica."""
    defs = [d for d in METRICS.values() if d.source == "replica"]
    families = {d.name: Metric(d.name, d.description, d.kind) for d in defs}
    for report in reports:
        info = report.replica
        labels = {"model": info.model, "role": info.role.value, REPLICA_LABEL: info.replica_id}
        for name, value in replica_values(report.stats).items():
            suffix = "_total" if METRICS[name].kind == "counter" else ""
            families[name].add_sample(name + suffix, labels, float(value))
    return list(families.values())


def router_families(text: str) -> list[Metric]:
    return _of_source(text_string_to_metric_families(text), "router") if text else []


class _Families:
    """A registry-like holder of ready families, for ``generate_latest``."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


def render(cluster: ClusterMetrics, vllm_names: bool = False) -> bytes:
    """The /metrics body: request, replica and router metrics (and their
    vLLM names when asked)."""
    families = (request_families() + replica_families(cluster.reports)
                + router_families(cluster.router_text))
    if vllm_names:
        families += vllm_families(families)
    return generate_latest(_Families(families))
