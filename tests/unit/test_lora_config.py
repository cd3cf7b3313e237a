"""LoRA settings of the operator file: what ``models[].model`` accepts and
refuses, and a route whose variant is an adapter of the file."""

import pytest

from splitserve.cluster.config import ConfigError, parse_config
from splitserve.cluster.config.routes import servable_names
from splitserve.cluster.serve.route_client import RouteClient
from splitserve.cluster.serve.workers import INGRESS_ONLY_FIELDS


def model(**kw):
    return {"model": {"name": "llama", **kw}}


def test_adapters_and_slots():
    cfg = parse_config({"models": [model(max_loras=2, max_lora_rank=32, adapters=[
        {"name": "sql", "path": "/a/sql"}, {"name": "chat", "path": "/a/chat"}])]})
    spec = cfg.models[0].model
    assert (spec.max_loras, spec.max_lora_rank, spec.max_cpu_loras) == (2, 32, None)
    assert [a.name for a in spec.adapters] == ["sql", "chat"]
    assert "adapters" in INGRESS_ONLY_FIELDS  # editing them rebuilds no replica


@pytest.mark.parametrize("kw,message", [
    (dict(adapters=[{"name": "sql", "path": "/a"}]), "max_loras is 0"),
    (dict(max_loras=1, adapters=[{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]),
     "unique"),
    (dict(max_loras=1, adapters=[{"name": "llama", "path": "/a"}]), "unique"),
    (dict(max_loras=4, max_cpu_loras=2), "max_cpu_loras"),
    (dict(max_loras=1, adapters=[{"name": "sql"}]), "path"),
    (dict(max_lora_rank=0), "max_lora_rank"),
])
def test_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [model(**kw)]})


def test_a_route_variant_may_be_an_adapter_of_the_file():
    cfg = parse_config({
        "models": [model(max_loras=1, adapters=[{"name": "sql-v2", "path": "/a/sql2"}])],
        "routes": [{"name": "sql", "variants": [{"name": "llama", "weight": 90},
                                                {"name": "sql-v2", "weight": 10}]}]})
    assert servable_names(cfg.models) == {"llama", "sql-v2"}
    client = RouteClient.for_config(cfg, 0.5)  # the ingress keeps the adapter variant
    assert client.table.get("sql").variants == ("llama", "sql-v2")
    with pytest.raises(ConfigError, match="not served"):
        parse_config({"models": [model()], "routes": [
            {"name": "sql", "variants": [{"name": "sql-v2", "weight": 1}]}]})
