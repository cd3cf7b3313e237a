"""The ``routes`` section of the operator file: what it accepts, what it
refuses (with the route named), how an edit reads in ``config_changes`` and
what the route controller receives."""

import pytest

from splitserve.cluster.config import (ConfigError, RouteSpec, ServedModel, config_changes,
                                       parse_config)
from splitserve.cluster.config.routes import check_routes, servable_names
from splitserve.router.route_messages import RoutePolicy, decode, encode

MODELS = [{"model": {"name": "v1"}}, {"model": {"name": "v2"}}]


def cfg(*routes):
    return parse_config({"models": MODELS, "routes": list(routes)})


def route(weights=(90, 10), **kw):
    return {"name": "chat", "variants": [{"name": "v1", "weight": weights[0]},
                                         {"name": "v2", "weight": weights[1]}], **kw}


def test_a_route_becomes_its_policy():
    r = cfg(route(key_header="X-Tenant", ramp={"variant": "v2", "steps": [5, 50, 100],
                                               "ttft": {"percentile": "p99", "max_ratio": 1.5}}))
    p = r.routes[0].policy()
    assert p.variants == ("v1", "v2") and p.weights == (90.0, 10.0)
    assert p.key_header == "x-tenant" and p.ramp.steps == (5.0, 50.0, 100.0)
    assert p.ramp.ttft.percentile == "p99" and p.ramp.max_error_rate == 0.05
    assert decode(encode((p,)), tuple[RoutePolicy, ...]) == (p,)  # as deploy sends it


@pytest.mark.parametrize("bad,message", [
    ({"name": "v1", "variants": [{"name": "v2", "weight": 1}]},
     "route 'v1' has the name of a served model"),
    (route() | {"variants": [{"name": "v1", "weight": 1}, {"name": "v3", "weight": 1}]},
     "variants ['v3'] are not served"),
    (route((0, 0)), "weights must add up to more than 0"),
    (route((-1, 5)), "greater than or equal to 0"),
    (route() | {"variants": [{"name": "v1", "weight": 1}, {"name": "v1", "weight": 2}]},
     "variants repeated: ['v1']"),
    (route(ramp={"variant": "v3", "steps": [10]}), "ramp.variant 'v3' is not one of"),
    (route(ramp={"variant": "v2", "steps": [10, 5]}), "ramp steps must increase"),
    (route(ramp={"variant": "v2", "steps": [0, 50]}), "percents in (0, 100]"),
    (route((0, 10), ramp={"variant": "v2", "steps": [10]}), "a ramp needs a baseline"),
    (route(ramp={"variant": "v2", "steps": [10], "ttft": {"percentile": "p75",
                                                          "max_ratio": 2}}), "p50"),
    (route(key_header=" "), "key_header must name a header"),
])
def test_invalid_routes_are_refused(bad, message):
    with pytest.raises(ConfigError) as e:
        cfg(bad)
    assert message in str(e.value)


def test_route_names_are_unique():
    with pytest.raises(ConfigError, match="route names must be unique"):
        cfg(route(), route())


class AdapterServedModel(ServedModel):
    """A served model that declares adapters, as the adapter section will."""

    adapters: list[str] = []


def test_adapter_names_are_servable_where_models_declare_them():
    models = [AdapterServedModel.model_validate({"model": {"name": "base"},
                                                 "adapters": ["sql-lora"]})]
    assert servable_names(models) == {"base", "sql-lora"}
    spec = RouteSpec.model_validate({"name": "sql", "variants": [
        {"name": "base", "weight": 1}, {"name": "sql-lora", "weight": 1}]})
    check_routes([spec], models)  # accepted
    with pytest.raises(ValueError, match="not served"):
        check_routes([spec], parse_config({"models": [{"model": {"name": "base"}}]}).models)


def test_an_edit_reads_per_route_and_variant():
    lines = config_changes(cfg(route((90, 10))), cfg(route((80, 20))))
    assert lines == ["routes[chat].variants[v1].weight: 90.0 -> 80.0",
                     "routes[chat].variants[v2].weight: 10.0 -> 20.0"]
