"""The Grafana dashboard queries only metrics splitserve defines, under the
names it scrapes them by (/metrics of the API port; Ray's exporter for the
autoscaler's), and shows every one of them."""

import json
import re
from pathlib import Path

from splitserve.cluster.observability.metric_defs import REPLICA_LABEL
from splitserve.cluster.observability.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "splitserve-dashboard.json"
SERIES = re.compile(r"\b((?:ray_)?splitserve_[a-z0-9_]+)")


def exprs(dash: dict) -> list[str]:
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["query"]["query"])
    return out


def by_series() -> dict:
    return {n: d for d in METRICS.values() for n in d.dashboard_names()}


def labels_of(d) -> set[str]:
    """``le`` on histogram buckets; Ray adds WorkerId, NodeAddress, ... too."""
    return set(d.api_labels() if d.on_api_port else d.tags) | {"le"}


def test_every_expr_references_defined_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exported = {n: d.name for n, d in by_series().items()}
    used = set()
    for e in exprs(dash):
        names = SERIES.findall(e)
        assert names, f"query names no splitserve metric: {e}"
        unknown = [n for n in names if n not in exported]
        assert not unknown, f"{unknown} not exported under that name by any metric in splitserve.cluster.observability.metrics: {e}"
        used |= {exported[n] for n in names}
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"


def test_only_autoscaler_metrics_are_read_from_ray():
    for d in METRICS.values():
        prefix = "splitserve_" if d.on_api_port else "ray_splitserve_"
        assert all(n.startswith(prefix) for n in d.dashboard_names()), d.name
        assert d.on_api_port == (d.source != "autoscaler")


def test_labels_in_queries_exist_on_the_metric():
    dash = json.loads(DASHBOARD.read_text())
    series = by_series()
    for e in exprs(dash):
        for name, sel in re.findall(r"((?:ray_)?splitserve_[a-z0-9_]+)\{([^}]*)\}", e):
            for label in re.findall(r"([a-zA-Z_]+)\s*=~?", sel):
                assert label in labels_of(series[name]), (name, label)
        for group in re.findall(r"by \(([^)]*)\)", e):
            tags = set().union(*(labels_of(series[n]) for n in SERIES.findall(e)))
            for label in (g.strip() for g in group.split(",")):
                assert label in tags, f"{e}: groups by {label!r}, which no metric in it has"


def test_replica_series_are_deduplicated_across_ingress_scrapes():
    """Every ingress replica serves the same replica series: a sum over them
    must take one per replica first."""
    dash = json.loads(DASHBOARD.read_text())
    for e in exprs(dash):
        for name in SERIES.findall(e):
            d = by_series()[name]
            if d.source == "replica" and e.startswith("sum"):
                assert f"max by (model, role, {REPLICA_LABEL})" in e, e


def test_panels_are_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert {"x", "y", "w", "h"} <= pos.keys() and pos["x"] + pos["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
