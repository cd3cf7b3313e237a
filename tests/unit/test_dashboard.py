"""The Grafana dashboard queries only metrics splitserve defines, under the
names Ray exports them with, and shows every one of them."""

import json
import re
from pathlib import Path

from splitserve.cluster.observability.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "splitserve-dashboard.json"
SERIES = re.compile(r"\b(ray_splitserve_[a-z0-9_]+)")


def exprs(dash: dict) -> list[str]:
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["query"]["query"])
    return out


def test_every_expr_references_defined_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exported = {n: d.name for d in METRICS.values() for n in d.exported_names()}
    used = set()
    for e in exprs(dash):
        names = SERIES.findall(e)
        assert names, f"query names no splitserve metric: {e}"
        unknown = [n for n in names if n not in exported]
        assert not unknown, f"{unknown} not exported by any metric in splitserve.cluster.observability.metrics: {e}"
        used |= {exported[n] for n in names}
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"


def test_labels_in_queries_exist_on_the_metric():
    dash = json.loads(DASHBOARD.read_text())
    ray_labels = {"le"}  # histogram buckets; Ray adds WorkerId, NodeAddress, ... too
    by_series = {n: d for d in METRICS.values() for n in d.exported_names()}
    for e in exprs(dash):
        for name, sel in re.findall(r"(ray_splitserve_[a-z0-9_]+)\{([^}]*)\}", e):
            for label in re.findall(r"([a-zA-Z_]+)\s*=~?", sel):
                assert label in by_series[name].tags or label in ray_labels, (name, label)
        for group in re.findall(r"by \(([^)]*)\)", e):
            names = SERIES.findall(e)
            tags = set().union(*(by_series[n].tags for n in names)) | ray_labels
            for label in (g.strip() for g in group.split(",")):
                assert label in tags, f"{e}: groups by {label!r}, which no metric in it has"


def test_panels_are_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert {"x", "y", "w", "h"} <= pos.keys() and pos["x"] + pos["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
