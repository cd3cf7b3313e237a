"""What /ready means beyond the pools: the router a model's requests go to
serves it, and no ingress replica of another config still takes requests
(``splitserve.cluster.serve.rollout``)."""

import asyncio

import msgspec

from splitserve.cluster.config import parse_config
from splitserve.engine.roles import Role
from splitserve.cluster.serve.orchestrator import ClusterBackend
from splitserve.cluster.serve.rollout import Registration, ingress_digest, rollout_problems
from splitserve.cluster.serve.router_client import RouterClient
from splitserve.cluster.serve.router_names import router_order
from tests.unit.test_router_actor import decode
from tests.unit.test_router_client import FakeRouter


def config(*models, min_replicas=1):
    return parse_config({"models": [
        {"model": {"name": m, "path": "/x"}, "mode": "colocated",
         "decode": {"min_replicas": min_replicas, "max_replicas": 4}} for m in models]})


def test_a_config_is_named_by_what_the_ingress_uses():
    a = ingress_digest(config("a"), "v1")
    assert a == ingress_digest(config("a"), "v1")
    assert a != ingress_digest(config("a", "b"), "v1")  # a model added
    assert a != ingress_digest(config("a"), "v2")  # a secret changed
    assert a == ingress_digest(config("a", min_replicas=2), "v1")  # only a pool's bounds


def test_a_replica_is_ready_only_when_every_live_replica_serves_the_target():
    now = 100.0
    me = {"me": Registration("new", now)}
    assert rollout_problems("new", "new", me, now) == []
    assert rollout_problems("new", None, me, now) == []  # no target published: only replicas
    [why] = rollout_problems("old", "new", {"me": Registration("old", now)}, now, me="me")
    assert "being replaced" in why
    old = {**me, "r1": Registration("old", now - 1.0)}
    [why] = rollout_problems("new", "new", old, now)
    assert "1 ingress replica(s) still serve an earlier config (r1)" in why
    assert rollout_problems("new", None, old, now) != []
    # a replica killed without unregistering ages out
    assert rollout_problems("new", "new", {**me, "r1": Registration("old", now - 5.0)}, now) == []


def backend(cfg, routers, problems=()):
    be = ClusterBackend.__new__(ClusterBackend)  # no checkpoints: only the model table is used
    be.cfg = cfg
    be._models = {s.model.name: None for s in cfg.models}
    be._router = RouterClient(len(routers), heartbeat_s=10.0, handles=routers,
                              models=[s.model.name for s in cfg.models])
    async def rollout_problems():
        return list(problems)
    be._rollout_problems = rollout_problems
    return be


def ready(be):
    return asyncio.run(be.readiness())


def test_readiness_asks_the_router_each_model_is_placed_by():
    cfg = config("m", "n")
    # "m" is placed by router 0, "n" by router 1 (the configured models take turns)
    assert [router_order(m, 2, ["m", "n"])[0] for m in ("m", "n")] == [0, 1]
    # router 1 runs a config from before "n" was added: requests for "n" would be refused
    routers = [FakeRouter(models=("m", "n")), FakeRouter(models=("m",))]
    for r in routers:
        r.actor.update_stats(decode_of("m"))
    r = ready(backend(cfg, routers))
    assert not r.ready and r.problems == ("router 1 does not serve model 'n'",)
    assert r.to_dict()["reason"].startswith("router 1 does not serve model 'n'")
    # its placing router down: the next in its order answers, as requests would go there
    routers[1].dead = True
    be = backend(cfg, routers)
    be._router._links[1].up = False
    assert ready(be).ready is False  # router 0 has no live replica of "n" yet
    routers[0].actor.update_stats(decode_of("n"))
    assert ready(be).ready
    routers[0].dead = True  # no router at all
    assert ready(be).error.startswith("the router is unavailable")


def decode_of(model):
    """A live colocated replica of ``model``, as it pushes its stats."""
    rep = decode(f"c-{model}", Role.COLOCATED)
    return msgspec.structs.replace(
        rep, replica=msgspec.structs.replace(rep.replica, model=model))


def test_a_rollout_or_a_model_missing_from_the_table_is_not_ready():
    routers = [FakeRouter(models=("m",))]
    routers[0].actor.update_stats(decode_of("m"))
    assert ready(backend(config("m"), routers)).ready
    r = ready(backend(config("m"), routers, ["the ingress is being rolled out"]))
    assert not r.ready and r.reason() == "the ingress is being rolled out"
    be = backend(config("m"), routers)
    be._models = {}
    assert ready(be).problems == ("model 'm' is not in this ingress' model table",)


def test_several_ingress_replicas_need_a_fixed_grpc_port():
    import pytest

    from splitserve.cluster.config import ConfigError

    base = {"models": [{"model": {"name": "m", "path": "/x"}}]}
    cfg = parse_config({**base, "endpoints": {"ingress_replicas": 3}})
    assert cfg.endpoints.ingress_replicas == 3
    assert parse_config(base).endpoints.ingress_replicas == 1
    with pytest.raises(ConfigError, match="grpc_port 0"):
        parse_config({**base, "endpoints": {"ingress_replicas": 2, "grpc_port": 0}})
    # the count is the deployment's: scaling the ingress is no new ingress config
    assert ingress_digest(cfg, "v") == ingress_digest(parse_config(base), "v")


def test_a_setting_the_http_mode_does_not_read_replaces_no_ingress():
    from splitserve.cluster.serve.ingress import ingress_args

    base = {"models": [{"model": {"name": "m", "path": "/x"}}]}

    def cfg(mode, head):
        return parse_config({**base, "endpoints": {"http_server": mode, "head_timeout_s": head}})

    # behind Serve's proxy the head deadline is the proxy's: the same config
    # name and the same replica arguments, so Serve replaces no replica
    assert ingress_digest(cfg("proxy", 5), "v") == ingress_digest(cfg("proxy", 30), "v")
    assert ingress_digest(cfg("ingress", 5), "v") != ingress_digest(cfg("ingress", 30), "v")
    proxy = [ingress_args(cfg("proxy", h))["endpoints"] for h in (5, 30)]
    assert proxy[0] == proxy[1] and "head_timeout_s" not in proxy[0]
    assert [ingress_args(cfg("ingress", h))["endpoints"]["head_timeout_s"] for h in (5, 30)] == [5, 30]
