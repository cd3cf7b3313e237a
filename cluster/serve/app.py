"""Build and deploy the Ray Serve applications described by a ClusterConfig.

Each pool is its own Serve application (``<model>-prefill``,
``<model>-decode`` or ``<model>-colocated``) so each can be scaled and
updated on its own; the router is a detached named actor; the ingress
application serves the client APIs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterable

import ray
from ray import serve

from splitserve.cluster.config import ClusterConfig, ConfigError, ModelSpec, ServedModel
from splitserve.cluster.serve import app_status, router_state, secrets
from splitserve.cluster.serve.app_status import DeployInProgress
from splitserve.cluster.serve.http_proxy import (check_mode, check_unchanged, proxy_running,
                                                 start_serve)
from splitserve.cluster.serve.rollout import ingress_view
from splitserve.cluster.serve.router_actor import ensure_routers, get_router, kill_routers
from splitserve.cluster.serve.router_names import NAMESPACE
from splitserve.cluster.serve.workers import worker_deployment
from splitserve.engine.roles import Role
from splitserve.router.config import ModelFacts, RouterConfig

log = logging.getLogger("splitserve.app")
ROUTES_WAIT_S = 10.0  # how long deploy waits for the ingresses to take edited routes

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


def app_name(model: str, role: Role) -> str:
    """The Serve application of ``model``'s pool playing ``role``."""
    return f"{model}-{role.value}"


def pool_apps(served: ServedModel, cfg: ClusterConfig,
              token_version: str) -> dict[str, tuple[Role, Any]]:
    """app name -> (role, bound deployment) for one model's pools;
    ``token_version`` is ``secrets.token_version()`` (after
    ``secrets.publish``): a new cluster token rolls the pools, a new API key
    does not (replicas never read the keys)."""
    out = {}
    for role in served.roles():
        app = app_name(served.model.name, role)
        out[app] = (role, worker_deployment(app, role, served.pool(role), served.engine_spec(role),
                                            cfg.transfer, cfg.router, token_version,
                                            cfg.observability.tracing))
    return out


def model_facts(spec: ModelSpec) -> ModelFacts:
    """What the router needs of one model: its engines' block size, and the
    KV bytes of one token from its checkpoint's shape and its KV dtype
    (dtype ``auto`` counted as float32, the widest an engine picks)."""
    import torch

    from splitserve.cluster.serve.checkpoints import checkpoint_dir
    from splitserve.engine.config import DTYPES
    from splitserve.engine.loader import load_checkpoint

    mc = load_checkpoint(checkpoint_dir(spec)).model_config
    kv_dtype = torch.float8_e4m3fn if spec.kv_cache_dtype == "fp8" else (
        torch.float32 if spec.dtype == "auto" else DTYPES[spec.dtype])
    return ModelFacts(block_size=spec.block_size, kv_bytes_per_token=mc.kv_bytes_per_token(kv_dtype))


def check_tensor_parallel(cfg: ClusterConfig) -> None:
    """Raise ConfigError for a pool whose tensor_parallel_size its model's
    checkpoint cannot be split by (heads, intermediate sizes, fp8 scale
    groups), before any replica is built."""
    from splitserve.cluster.serve.checkpoints import checkpoint_dir
    from splitserve.engine.loader import load_checkpoint
    from splitserve.engine.parallel.plan import TensorParallelConfigError, check

    for served in cfg.models:
        degrees = {role: served.engine_spec(role).tensor_parallel_size for role in served.roles()}
        if all(tp == 1 for tp in degrees.values()):
            continue
        mc = load_checkpoint(checkpoint_dir(served.model)).model_config
        for role, tp in degrees.items():
            try:
                check(mc, tp)
            except TensorParallelConfigError as e:
                raise ConfigError(f"model {served.model.name!r}, {role.value} pool: {e}") from None


def router_config(cfg: ClusterConfig) -> RouterConfig:
    """The router's config: the operator's router section over each model's
    facts. Raises ConfigError naming the model whose checkpoint cannot be
    read (a wrong ``path``), so a deploy refuses the file before it changes
    anything."""
    from splitserve.engine.errors import CheckpointError

    facts = {}
    for served in cfg.models:
        try:
            facts[served.model.name] = model_facts(served.model)
        except (CheckpointError, OSError) as e:
            raise ConfigError(f"model {served.model.name!r}: {e}") from None
    return cfg.router.router_config(facts)


def preflight(cfg: ClusterConfig) -> RouterConfig:
    """What a deploy checks of ``cfg`` before it changes anything (also
    ``deploy --dry-run``): each model's checkpoint is readable and splits by
    its pools' tensor-parallel degrees, each configured LoRA adapter reads
    and fits its model (as the ingress checks it at its start), and
    tracing's exporter is installed. Returns the router's config; raises
    ConfigError naming the problem."""
    from splitserve.cluster.observability.tracing import check_installed

    check_tensor_parallel(cfg)
    check_installed(cfg.observability.tracing)
    rcfg = router_config(cfg)
    check_adapters(cfg)
    return rcfg


def check_adapters(cfg: ClusterConfig) -> None:
    """Raise ConfigError naming the first configured adapter the ingress
    would refuse at its start (unreadable, a rank over ``max_lora_rank``,
    modules its model lacks, a name taken)."""
    from splitserve.cluster.api.adapter_registry import AdapterRegistry, BaseFacts
    from splitserve.cluster.serve.checkpoints import checkpoint_dir
    from splitserve.engine.errors import SplitserveError
    from splitserve.engine.loader import load_checkpoint

    if not any(s.model.adapters for s in cfg.models):
        return
    bases = {}
    for served in cfg.models:
        spec = served.model
        bases[spec.name] = BaseFacts(load_checkpoint(checkpoint_dir(spec)).model_config,
                                     spec.max_loras, spec.max_lora_rank)
    registry = AdapterRegistry(bases)
    for served in cfg.models:
        for a in served.model.adapters:
            try:
                registry.load(a.name, a.path, served.model.name)
            except (SplitserveError, OSError) as e:
                raise ConfigError(f"model {served.model.name!r}, adapter {a.name!r}: {e}") from None


def connect(address: str | None = None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)


def deploy(cfg: ClusterConfig, address: str | None = None, wait_s: float = 300.0,
           with_ingress: bool = True) -> dict[str, Any]:
    """Deploy (or update in place) every application of ``cfg``. Returns a
    summary {apps, removed}. Blocks until every pool has registered with the
    router and (``with_ingress``) the ingress answers ready, i.e. /v1 serves
    every model (``wait_for_ingress``). Raises ``DeployInProgress``, changing
    nothing, while another deploy holds the ledger's deploy lease
    (``OpsLedger.begin_deploy``); ``DeployFailed`` naming each
    application Serve marks DEPLOY_FAILED (a replica constructor raising)
    and its reason, as soon as it does, or TimeoutError naming what is
    missing and what Serve says of it (e.g. replicas waiting for resources).

    The router and the route controller are up before any application is
    submitted (replicas register with the router as they start); the pools
    and the ingress are then submitted together and start at once.

    On a running cluster only what changed is touched: a pool whose replicas
    are built the same way (only its bounds or autoscaling differ) keeps its
    replicas; the router is reconfigured, and the ingress redeployed, only
    when their settings changed; pools of models no longer listed are
    deleted (their replicas drain)."""
    from splitserve.cluster.autoscaling.ledger import get_ledger

    # everything that can refuse the file runs before anything is changed:
    # secrets, router and Serve applications stay as they were
    rcfg = preflight(cfg)
    connect(address)
    deadline = time.monotonic() + wait_s
    ledger = get_ledger(create=True)
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    # two deploys interleaved would leave the cluster (and the ledger) on
    # whichever submitted last, not the edit made last: one at a time
    busy = ray.get(ledger.begin_deploy.remote(holder, wait_s + ROUTES_WAIT_S + 60.0))
    if busy is not None:
        raise DeployInProgress(f"another deploy ({busy[0]}) has been applying its config for "
                               f"{max(0.0, time.time() - busy[1]):.0f}s; nothing was changed: "
                               "run this one again once it is done")
    try:
        with SERVE_LOCK:
            out, submitted, version = _apply(cfg, rcfg, with_ingress, ledger)
        wait_for_pools(cfg, wait_s, submitted)
        out.update(_apply_routes(cfg, with_ingress))
        if with_ingress:
            wait_for_ingress(deadline)
        # recorded once it runs: after a failed deploy the next one compares
        # against the last config that ran and resubmits whatever differs
        ray.get(ledger.set_config.remote(secrets.public_config(cfg), version))
    finally:
        ledger.end_deploy.remote(holder)
    return out


def _apply_routes(cfg: ClusterConfig, with_ingress: bool) -> dict[str, Any]:
    """Hand the routes to the route controller once every variant's pools
    are up, and wait (briefly) until the running ingresses hold them: a
    weight edit is then in force when deploy returns, no replica restarted."""
    from splitserve.cluster.serve.route_actor import apply_routes, wait_for_ingresses

    version, lines = apply_routes([r.policy() for r in cfg.routes])
    behind = wait_for_ingresses(version, ROUTES_WAIT_S) if with_ingress else []
    if behind:
        log.warning("routes version %d not yet confirmed by ingresses %s", version, behind)
    return {"routes": lines, "routes_pending": behind}


def _apply(cfg: ClusterConfig, rcfg: RouterConfig, with_ingress: bool,
           ledger) -> tuple[dict[str, Any], list[str], str]:
    """Submit what changed (``rcfg``: ``router_config(cfg)``); returns
    (summary, the applications submitted, the secrets version published)."""
    prev_dump = ray.get(ledger.config.remote())
    prev = ClusterConfig.model_validate(prev_dump) if prev_dump else None
    start_serve(cfg.endpoints)
    proxy = proxy_running()
    if proxy is not None:  # the running Serve's truth, whatever the ledger says
        check_mode(proxy, cfg.endpoints)
    running = set(serve_status().applications)
    if prev is not None and not running & {a for m in prev.models for a in pool_apps_names(m)}:
        prev = None  # a ledger left from a cluster since shut down
        ray.get(ledger.reset.remote())
    if prev is not None:  # before anything changes
        check_unchanged(prev.endpoints, cfg.endpoints)
    version = secrets.publish(cfg)
    tracing = cfg.observability.tracing
    ensure_routers(rcfg, cfg.router.routers,
                   reconfigure=(prev is None or router_state.load().config != rcfg
                                or prev.observability.tracing != tracing),
                   tracing=None if tracing is None else tracing.model_dump(),
                   tls=None if cfg.transfer.tls is None else cfg.transfer.tls.model_dump())
    from splitserve.cluster.serve.route_actor import get_route_actor

    get_route_actor(create=True)  # the ingresses follow it; the routes come once pools are up
    apps: dict[str, str] = {}  # app name -> its role, or "ingress"
    targets: list[serve.RunTarget] = []
    for served in cfg.models:
        for app, (role, bound) in pool_apps(_first_deploy_only(served, running), cfg,
                                            secrets.token_version()).items():
            targets.append(serve.RunTarget(bound, name=app, route_prefix=None))
            apps[app] = role.value
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

        if ("ingress" not in running or prev is None or ingress_view(prev) != ingress_view(cfg)
                or prev.endpoints.ingress_replicas != cfg.endpoints.ingress_replicas
                or version != ray.get(ledger.secrets_version.remote())):
            # it needs no pool to start (it answers 503 until they register)
            targets.append(serve.RunTarget(ingress_app(cfg, version), name="ingress",
                                           route_prefix="/"))
        apps["ingress"] = "ingress"
    if targets:
        # submitted together, none waited for: the pools and the ingress build
        # their replicas at once (serve.run returns only once its application
        # runs, one after another); deploy then watches them all in
        # wait_for_pools / wait_for_ingress, failures included
        serve.run_many(targets, wait_for_applications_running=False)
    return {"apps": apps, "removed": removed}, [t.name for t in targets], version


def pool_apps_names(served: ServedModel) -> list[str]:
    return [app_name(served.model.name, r) for r in served.roles()]


def _first_deploy_only(served: ServedModel, running: set[str]) -> ServedModel:
    """``initial_replicas`` sizes a pool's first deploy; applied to a running
    pool it would reset the size its autoscaler chose."""
    out = served.model_copy(deep=True)
    for role in Role:
        if app_name(served.model.name, role) in running:
            out.pool(role).initial_replicas = None
    return out


def wait_for_pools(cfg: ClusterConfig, wait_s: float, submitted: Iterable[str] = ()) -> None:
    """Until every pool of ``cfg`` that requests need has a replica
    registered with the router and every application in ``submitted``
    (those this deploy handed to Serve, ingress included) is RUNNING; a
    redeployed pool is then on its new version. Raises ``DeployFailed`` as
    soon as one of ``submitted`` fails, TimeoutError after ``wait_s``."""
    router = get_router()
    deadline = time.monotonic() + wait_s
    submitted = list(submitted)
    apps = app_status.AppsReport()
    checked = float("-inf")  # when Serve's status was last read
    while True:
        reps = ray.get(router.replicas.remote())
        missing = []
        for served in cfg.models:
            name = served.model.name
            pools = reps.get(name, {Role.PREFILL.value: [], Role.DECODE.value: []})
            for role in served.roles():
                # requests need a decode replica; a prefill pool may be empty
                needed = role.pool is Role.DECODE or served.pool(role).min_replicas > 0
                if needed and not pools[role.pool.value]:
                    missing.append(app_name(name, role))
        now = time.monotonic()
        # Serve's status costs a controller round trip: read it every 0.5 s
        # for failures, and whenever the router has every pool
        if submitted and (not missing or now - checked >= 0.5 or now > deadline):
            apps, checked = app_status.report(serve_status(), submitted), now
            apps.raise_failed()
            # the ingress is waited for by wait_for_ingress
            submitted = [a for a in submitted if a in apps.starting]
        pending = [a for a in submitted if a != "ingress"]
        if not missing and not pending:
            return
        if now > deadline:
            notes = [f"{a} ({apps.starting[a]})" if a in apps.starting else a
                     for a in dict.fromkeys(missing + pending)]
            raise TimeoutError(f"pools not ready after {wait_s:.0f}s: {', '.join(notes)}")
        time.sleep(0.1)  # one router call: a deploy returns within 0.1 s of its pools


def wait_for_ingress(deadline: float, app: str = "ingress") -> None:
    """Until the ingress application runs and says it is ready: every
    model's pools live at its router and no replica of an earlier ingress
    config still takes requests (``Ingress.readiness_report``, what /ready
    answers). Raises ``DeployFailed`` if it fails to deploy, TimeoutError
    with its last reason at ``deadline`` (monotonic)."""
    reason = "the ingress application is not running yet"
    while True:
        overview = serve_status()
        status = overview.applications.get(app)
        if status is not None and status.status == "RUNNING":
            try:
                report = serve.get_app_handle(app).readiness_report.remote().result(
                    timeout_s=10.0)
                if report["status"] == "ready":
                    return
                reason = report.get("reason", "not ready")
            except Exception as e:  # noqa: BLE001 - a replica starting or stopping
                reason = f"the ingress did not answer: {type(e).__name__}: {e}"
        elif status is not None and status.status == "DEPLOY_FAILED":
            app_status.report(overview, [app]).raise_failed()
        elif status is not None:
            reason = f"the ingress application is {status.status}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ingress is not ready: {reason}")
        time.sleep(0.2)


def shutdown() -> None:
    """Tear down every splitserve application and the router."""
    from splitserve.cluster.serve import rollout
    from splitserve.cluster.serve.adapter_store import clear_adapters
    from splitserve.cluster.serve.route_actor import kill_route_actor

    serve.shutdown()
    kill_routers()
    kill_route_actor()
    rollout.clear()
    clear_adapters()
