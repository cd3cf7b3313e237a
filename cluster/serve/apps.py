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


def _ensure_cluster_actors(cfg: ClusterConfig) -> None:
    import ray

    from splitserve.cluster.serve.app import router_config
    from splitserve.cluster.autoscaling.ledger import get_ledger
    from splitserve.cluster.serve.router_actor import get_router

    get_router(create_with=router_config(cfg))
    ray.get(get_ledger(create=True).set_config.remote(cfg.model_dump()))


def pool_app(args: dict[str, Any]):
    """args: {config, model, role}; role is prefill, decode or colocated."""
    from splitserve.cluster.serve.app import pool_apps

    cfg = _config(args)
    served = {m.model.name: m for m in cfg.models}.get(args.get("model"))
    if served is None:
        raise ConfigError(f"args.model {args.get('model')!r} is not in the config; models: "
                          f"{sorted(m.model.name for m in cfg.models)}")
    apps = pool_apps(served, cfg)
    name = f"{served.model.name}-{args.get('role')}"
    if name not in apps:
        raise ConfigError(f"args.role {args.get('role')!r} does not exist for model "
                          f"{served.model.name!r} in {served.mode} mode; pools: {sorted(apps)}")
    _ensure_cluster_actors(cfg)
    return apps[name][1]


def ingress_app(args: dict[str, Any]):
    """args: {config}."""
    from splitserve.cluster.serve.ingress import ingress_app as build

    cfg = _config(args)
    _ensure_cluster_actors(cfg)
    return build(cfg)
