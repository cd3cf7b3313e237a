"""Build and deploy the Ray Serve applications described by a ClusterConfig.

Each pool is its own Serve application (``<model>-prefill``,
``<model>-decode`` or ``<model>-colocated``) so each can be scaled and
updated on its own; the router is a detached named actor; the ingress
application serves the client APIs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray import serve

from splitserve.cluster.config import ClusterConfig, ServedModel
from splitserve.cluster.serve import secrets
from splitserve.cluster.serve.router_actor import NAMESPACE, get_router
from splitserve.cluster.serve.workers import worker_deployment

log = logging.getLogger("splitserve.app")

# Ray Serve builds an autoscaling policy (on ``serve.status()``, and when a
# deployment's options are set) by registering the policy's module for
# pickling by value and unregistering it after; two threads doing so at once
# unregister it twice and one fails. Every Serve call of this process that
# builds policies goes through this lock.
SERVE_LOCK = threading.RLock()


def serve_status():
    """``serve.status()``, safe to call alongside a deploy in another thread."""
    with SERVE_LOCK:
        return serve.status()


def pool_apps(served: ServedModel, cfg: ClusterConfig,
              secrets_version: str) -> dict[str, tuple[str, Any]]:
    """app name -> (role, bound deployment) for one model's pools;
    ``secrets_version`` is what ``secrets.publish`` returned."""
    name = served.model.name
    roles = [("colocated", served.decode)] if served.mode == "colocated" else [
        ("prefill", served.prefill), ("decode", served.decode)]
    out = {}
    for role, pool in roles:
        app = f"{name}-{role}"
        out[app] = (role, worker_deployment(app, role, pool, served.model, cfg.transfer,
                                            cfg.router, secrets_version))
    return out


def router_config(cfg: ClusterConfig) -> dict[str, Any]:
    """RouterConfig fields from the operator config (KV size read per model)."""
    from splitserve.cluster.serve.checkpoints import checkpoint_dir
    from splitserve.engine.loader import load_checkpoint

    kv_bytes = {}
    block_sizes = set()
    for served in cfg.models:
        mc = load_checkpoint(checkpoint_dir(served.model)).model_config
        elem = 1 if served.model.kv_cache_dtype == "fp8" else (
            4 if served.model.dtype in ("auto", "float32") else 2)
        kv_bytes[served.model.name] = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * elem
        block_sizes.add(served.model.block_size)
    r = cfg.router
    return {"policy": r.policy, "block_size": min(block_sizes), "kv_bytes_per_token": kv_bytes,
            "max_queue_per_model": r.max_queue_per_model, "stats_ttl_s": r.stats_ttl_s,
            "network_bandwidth_bytes_per_s": r.network_bytes_per_s,
            "local_prefill_max_tokens": r.local_prefill_max_tokens,
            "max_queue_delay_s": r.max_queue_delay_s}


def connect(address: str | None = None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)


def deploy(cfg: ClusterConfig, address: str | None = None, wait_s: float = 300.0,
           with_ingress: bool = True) -> dict[str, Any]:
    """Deploy (or update in place) every application of ``cfg``. Returns a
    summary {apps, removed}. Blocks until every pool has registered with the
    router, or raises TimeoutError naming the missing pools.

    On a running cluster only what changed is touched: a pool whose replicas
    are built the same way (only its bounds or autoscaling differ) keeps its
    replicas; the router is reconfigured, and the ingress redeployed, only
    when their settings changed; pools of models no longer listed are
    deleted (their replicas drain)."""
    from splitserve.cluster.autoscaling.ledger import get_ledger

    connect(address)
    with SERVE_LOCK:
        out = _apply(cfg, with_ingress, get_ledger(create=True))
    wait_for_pools(cfg, wait_s)
    return out


def _apply(cfg: ClusterConfig, with_ingress: bool, ledger) -> dict[str, Any]:
    prev_dump = ray.get(ledger.config.remote())
    prev = ClusterConfig.model_validate(prev_dump) if prev_dump else None
    serve.start(http_options={"host": cfg.endpoints.host, "port": cfg.endpoints.http_port})
    running = set(serve_status().applications)
    if prev is not None and not running & {a for m in prev.models for a in pool_apps_names(m)}:
        prev = None  # a ledger left from a cluster since shut down
        ray.get(ledger.reset.remote())
    version = secrets.publish(cfg)
    rcfg = router_config(cfg)
    router = get_router(create_with=rcfg)
    if prev is None or router_config(prev) != rcfg:
        ray.get(router.reconfigure.remote(rcfg))
    apps: dict[str, str] = {}
    for served in cfg.models:
        for app, (role, bound) in pool_apps(_first_deploy_only(served, running), cfg,
                                            version).items():
            serve.run(bound, name=app, route_prefix=None, blocking=False)
            apps[app] = role
    removed = []
    if prev is not None:
        for served in prev.models:
            for app in pool_apps_names(served):
                if app not in apps and app in running:
                    serve.delete(app, _blocking=False)
                    ledger.forget.remote(app)
                    removed.append(app)
    if with_ingress:
        from splitserve.cluster.serve.ingress import ingress_app

        if ("ingress" not in running or prev is None or _ingress_view(prev) != _ingress_view(cfg)
                or version != ray.get(ledger.secrets_version.remote())):
            serve.run(ingress_app(cfg, version), name="ingress", route_prefix="/", blocking=False)
        apps["ingress"] = "ingress"
    ray.get(ledger.set_config.remote(secrets.public_config(cfg), version))
    return {"apps": apps, "removed": removed}


def pool_apps_names(served: ServedModel) -> list[str]:
    roles = ["colocated"] if served.mode == "colocated" else ["prefill", "decode"]
    return [f"{served.model.name}-{r}" for r in roles]


def _first_deploy_only(served: ServedModel, running: set[str]) -> ServedModel:
    """``initial_replicas`` sizes a pool's first deploy; applied to a running
    pool it would reset the size its autoscaler chose."""
    out = served.model_copy(deep=True)
    name = served.model.name
    for role, pool in (("prefill", out.prefill), ("decode", out.decode), ("colocated", out.decode)):
        if f"{name}-{role}" in running:
            pool.initial_replicas = None
    return out


def _ingress_view(cfg: ClusterConfig) -> dict[str, Any]:
    """The settings the ingress uses: everything but the pools and the
    secrets (their version is compared on its own)."""
    d = secrets.public_config(cfg)
    for m in d["models"]:
        m.pop("prefill")
        m.pop("decode")
    return d


def wait_for_pools(cfg: ClusterConfig, wait_s: float) -> None:
    router = get_router()
    deadline = time.monotonic() + wait_s
    while True:
        reps = ray.get(router.replicas.remote())
        missing = []
        for served in cfg.models:
            name = served.model.name
            r = reps.get(name, {"prefill": [], "decode": []})
            if not r["decode"]:
                missing.append(f"{name}-decode")
            if served.mode == "disaggregated" and served.prefill.min_replicas > 0 and not r["prefill"]:
                missing.append(f"{name}-prefill")
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"pools not ready after {wait_s:.0f}s: {', '.join(missing)}")
        time.sleep(0.5)


def shutdown() -> None:
    """Tear down every splitserve application and the router."""
    serve.shutdown()
    try:
        ray.kill(get_router())
    except ValueError:
        pass
