"""Serve application builders, for declarative deployment: a KubeRay
RayService's ``serveConfigV2`` or ``serve deploy``.

Each application names a builder and passes the operator config inline:

  applications:
    - name: llama-prefill
      import_path: splitserve.cluster.serve.apps:pool_app
      args: {model: llama, role: prefill, config: {<operator YAML>}}
    - name: ingress
      import_path: splitserve.cluster.serve.apps:ingress_app
      route_prefix: /
      args: {config: {<operator YAML>}}

Builders run inside the cluster; the first one creates the router and the
ops ledger. ``splitserve deploy`` does the same imperatively (and edits a
running pool's bounds in place); here a changed ``args`` rolls that
application's replicas, each draining before it stops.
"""

from __future__ import annotations

from typing import Any

from splitserve.cluster.config import ClusterConfig, ConfigError, parse_config


def _config(args: dict[str, Any]) -> ClusterConfig:
    if "config" not in args:
        raise ConfigError("builder args need 'config': the operator config as a mapping")
    return parse_config(args["config"], "serveConfigV2 args.config")


def _ensure_cluster_actors(cfg: ClusterConfig) -> str:
    """Create the routers if missing (reconfigure them when their stored
    config is another: the operator config changed), the route controller
    and the ledger, hand the routes to the controller and store the
    cluster's secrets; returns the secrets' version."""
    import ray

    from splitserve.cluster.autoscaling.ledger import get_ledger
    from splitserve.cluster.serve import router_state, secrets
    from splitserve.cluster.serve.app import router_config
    from splitserve.cluster.serve.route_actor import apply_routes
    from splitserve.cluster.serve.router_actor import ensure_routers

    version = secrets.publish(cfg)
    rcfg = router_config(cfg)
    tracing = cfg.observability.tracing
    ensure_routers(rcfg, cfg.router.routers, reconfigure=router_state.load().config != rcfg,
                   tracing=None if tracing is None else tracing.model_dump(),
                   tls=None if cfg.transfer.tls is None else cfg.transfer.tls.model_dump())
    apply_routes([r.policy() for r in cfg.routes])
    ray.get(get_ledger(create=True).set_config.remote(secrets.public_config(cfg), version))
    return version


def pool_app(args: dict[str, Any]):
    """args: {config, model, role}; role is prefill, decode or colocated."""
    from splitserve.cluster.serve.app import pool_apps, pool_apps_names

    cfg = _config(args)
    served = {m.model.name: m for m in cfg.models}.get(args.get("model"))
    if served is None:
        raise ConfigError(f"args.model {args.get('model')!r} is not in the config; models: "
                          f"{sorted(m.model.name for m in cfg.models)}")
    name = f"{served.model.name}-{args.get('role')}"
    names = pool_apps_names(served)
    if name not in names:
        raise ConfigError(f"args.role {args.get('role')!r} does not exist for model "
                          f"{served.model.name!r} in {served.mode} mode; pools: {names}")
    from splitserve.cluster.serve.secrets import token_version

    _ensure_cluster_actors(cfg)
    return pool_apps(served, cfg, token_version())[name][1]


def ingress_app(args: dict[str, Any]):
    """args: {config}."""
    from splitserve.cluster.serve.ingress import ingress_app as build

    cfg = _config(args)
    return build(cfg, _ensure_cluster_actors(cfg))
