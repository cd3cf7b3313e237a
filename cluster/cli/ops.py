"""Operator commands: ``splitserve deploy CONFIG`` applies an operator YAML to
a running cluster in place; ``splitserve status`` shows each pool's replicas,
load, bottleneck value and the autoscaler's last decision."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from splitserve.cluster.cli.ray_address import add_address_argument, join_cluster, join_or_report
from splitserve.engine.roles import Role


def add_subcommands(sub) -> None:
    d = sub.add_parser(
        "deploy", help="apply an operator config to a running cluster",
        description="Validate an operator YAML, connect to the running Ray cluster, show what "
                    "changes against the config applied last, and apply it in place: pools "
                    "whose replicas are built the same way keep them (bounds and autoscaling "
                    "edits take effect without restarts).")
    d.add_argument("config", nargs="?", help="operator YAML (examples in deploy/configs/)")
    d.add_argument("--config", dest="config_flag", metavar="FILE",
                   help="the operator YAML given as a flag, as serve, profile and simulate "
                        "take it (instead of CONFIG)")
    add_address_argument(d)
    d.add_argument("--dry-run", action="store_true",
                   help="validate and show the changes only (without a reachable cluster: "
                        "validate only)")
    d.add_argument("--wait-s", type=float, default=300.0,
                   help="how long to wait for every pool to be up (default: 300)")
    d.add_argument("--no-ingress", action="store_true", help="deploy the pools and router only")
    d.set_defaults(func=cmd_deploy)
    s = sub.add_parser(
        "status", help="pools, replicas, load, autoscaling decisions and routes",
        description="One row per pool: replicas running / target, bounds, bottleneck and its "
                    "value (load / target, 1.0 = on target), current load; then each pool's "
                    "latest autoscaling decision and last size change with their reasons; then "
                    "each route: its variants' weights in force, its ramp's step, guard "
                    "readings and last move with its reason.")
    add_address_argument(s)
    s.add_argument("--json", action="store_true",
                   help='print {"pools": [rows], "routes": [routes]} as JSON')
    s.add_argument("--history", action="store_true",
                   help="instead: each pool's size over time, one line per decision at which "
                        "its target or running replica count changed (the ledger keeps the "
                        "last 1,000 per pool)")
    s.set_defaults(func=cmd_status)
    x = sub.add_parser(
        "shutdown", help="remove splitserve from a running cluster (Ray keeps running)",
        description="Delete every splitserve application (pools, ingress), the router actors, "
                    "the route controller and the adapters loaded at run time from the running "
                    "Ray cluster; in-flight requests are cut. The Ray cluster itself keeps "
                    "running: `ray stop` (every Ray process of the machine, whoever started "
                    "it) or `ray down` ends it; a `splitserve serve` ends with Ctrl-C.")
    add_address_argument(x)
    x.set_defaults(func=cmd_shutdown)


# -- deploy ----------------------------------------------------------------------
def cmd_deploy(args) -> int:
    from splitserve.cluster.config import ClusterConfig, ConfigError, config_changes, load_config

    if args.config and args.config_flag and args.config != args.config_flag:
        print(f"error: two configs given: {args.config} and --config {args.config_flag}",
              file=sys.stderr)
        return 2
    args.config = args.config or args.config_flag
    if not args.config:
        print("error: deploy needs an operator YAML: splitserve deploy CONFIG "
              "(examples in deploy/configs/)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:  # what the deploy checks before it changes anything
        from splitserve.cluster.serve.app import preflight

        try:
            preflight(cfg)
        except ConfigError as e:
            print(f"error: {args.config}: {e}", file=sys.stderr)
            return 1
    try:
        join_cluster(args.address)
    except (ConnectionError, RuntimeError) as e:
        if args.dry_run:  # the file is checked; only the comparison needs the cluster
            print(f"{args.config}: valid; no Ray cluster to compare against ({e}): changes "
                  "not shown")
            return 0
        print(f"error: cannot connect to the Ray cluster: {e}", file=sys.stderr)
        return 1
    prev = _ledger_call("config")
    if prev is None:
        print(f"{args.config}: valid; nothing applied yet, deploying every pool")
    else:
        from splitserve.cluster.serve import secrets
        from splitserve.cluster.serve.secrets import public_config

        # the ledger keeps no secrets: compare without them (a new key or
        # token still rolls the replicas that read it)
        changes = config_changes(ClusterConfig.model_validate(prev),
                                 ClusterConfig.model_validate(public_config(cfg)))
        if secrets.version(cfg) != _ledger_call("secrets_version"):
            changes.append("auth: API keys or cluster token changed (values not shown): the "
                           "ingress rolls, and the pools too for a new cluster token")
        print(f"{args.config}: valid; {len(changes)} change(s)" + (":" if changes else ""))
        for line in changes:
            print(f"  {line}")
    if args.dry_run:
        problem = _refused_on_this_cluster(cfg, prev)
        if problem:  # what the deploy itself would refuse, before it changed anything
            print(f"error: {problem}", file=sys.stderr)
            return 1
        return 0
    from splitserve.cluster.serve.app import deploy
    from splitserve.cluster.serve.app_status import DeployFailed, DeployInProgress

    try:
        summary = deploy(cfg, wait_s=args.wait_s, with_ingress=not args.no_ingress)
    except (TimeoutError, ConfigError, DeployFailed, DeployInProgress) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("applied: " + ", ".join(sorted(summary["apps"])))
    if not args.no_ingress:
        from splitserve.cluster.serve.http_proxy import served_by, url

        ep = cfg.endpoints
        print(f"OpenAI HTTP API: {url(ep)}/v1 ({served_by(ep)}); gRPC API: port {ep.grpc_port} "
              "on the nodes that run an ingress replica")
    if summary.get("removed"):
        print("removed: " + ", ".join(summary["removed"]))
    for line in summary.get("routes", ()):
        print(line)
    if summary.get("routes_pending"):
        print("warning: ingresses not yet holding the new routes: "
              + ", ".join(summary["routes_pending"]), file=sys.stderr)
    return 0


def _refused_on_this_cluster(cfg, prev: dict[str, Any] | None) -> str | None:
    """Why the connected cluster would refuse ``cfg`` (``prev``: the config
    applied last): endpoints only a new Serve instance takes
    (``http_server``; in proxy mode the proxy's address and TLS files)."""
    from splitserve.cluster.config import ClusterConfig, ConfigError
    from splitserve.cluster.serve.http_proxy import check_mode, check_unchanged, proxy_running

    try:
        proxy = proxy_running() if prev is not None else None
        if proxy is not None:
            check_mode(proxy, cfg.endpoints)
        if prev is not None:
            check_unchanged(ClusterConfig.model_validate(prev).endpoints, cfg.endpoints)
    except ConfigError as e:
        return str(e)
    return None


ACTOR_WAIT_S = 30.0  # how long status waits for an actor Ray is restarting


def _ask_actor(get_actor, method: str, wait_s: float = ACTOR_WAIT_S) -> Any:
    """``method`` of the named actor ``get_actor()`` returns, asked again while
    Ray restarts it (its node was lost: calls fail until it runs elsewhere),
    for up to ``wait_s``; then the last error is raised. ValueError (no such
    actor) is raised at once."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get(getattr(get_actor(), method).remote(),
                           timeout=max(1.0, deadline - time.monotonic()))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.GetTimeoutError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def _ledger_call(method: str) -> Any:
    from splitserve.cluster.autoscaling.ledger import get_ledger

    try:
        return _ask_actor(get_ledger, method)
    except ValueError:  # nothing deployed through splitserve yet
        return None


# -- status ----------------------------------------------------------------------
@dataclass(frozen=True)
class PoolStatus:
    app: str
    role: str
    running: int
    target: int | None
    min_replicas: int
    max_replicas: int
    bottleneck: str  # compute | memory | network | requests | fixed
    value: float | None
    load: str
    decision: str
    decided_at: float | None
    last_change: str
    changed_at: float | None


def _load_summary(pool: Role, stats: list[dict[str, Any]]) -> str:
    if not stats:
        return "-"
    if pool is Role.PREFILL:
        pending = sum(s["pending_prompt_tokens"] for s in stats)
        tput = sum(s["prefill_tokens_per_s"] for s in stats)
        return f"{pending} pending tok, {tput:.0f} tok/s"
    used = sum(s["total_blocks"] - s["free_blocks"] for s in stats)
    total = sum(s["total_blocks"] for s in stats)
    seqs = sum(s["running_seqs"] for s in stats)
    cap = sum(s["max_seqs"] for s in stats)
    return f"KV {used / max(total, 1):.0%}, seqs {seqs}/{cap}"


def collect_status() -> tuple[dict[str, Any] | None, list[PoolStatus]]:
    """(config applied last, one PoolStatus per pool) from the ledger, Serve
    and the router."""
    import ray
    from splitserve.cluster.autoscaling.records import PoolDecisions
    from splitserve.cluster.serve.app import app_name, serve_status
    from splitserve.cluster.config import ClusterConfig
    from splitserve.cluster.serve.router_actor import get_router

    dump = _ledger_call("config")
    if not dump:
        return None, []
    cfg = ClusterConfig.model_validate(dump)
    decisions = _ledger_call("decisions") or {}
    apps = serve_status().applications
    router_down = ""
    try:
        reps = _ask_actor(get_router, "replicas")
    except ValueError:
        reps = {}
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ray.exceptions.GetTimeoutError) as e:
        # restarting for longer than status waits: the pools' sizes (Serve's)
        # are still shown, their load is not known
        reps, router_down = {}, f"router unavailable ({type(e).__name__})"
    rows = []
    for served in cfg.models:
        name = served.model.name
        for role in served.roles():
            pool = served.pool(role)
            app = app_name(name, role)
            st = apps.get(app)
            dep = st.deployments.get(app) if st else None
            running = int(dep.replica_states.get("RUNNING", 0)) if dep else 0
            d: PoolDecisions | None = decisions.get(app)
            latest = d.latest if d else None
            change = d.last_change if d else None
            stats = reps.get(name, {}).get(role.pool.value, [])
            rows.append(PoolStatus(
                app=app, role=role.value, running=running,
                target=latest.target if latest else fixed_target(pool),
                min_replicas=pool.min_replicas, max_replicas=pool.max_replicas,
                bottleneck=pool.autoscaling.bottleneck if pool.autoscaling else "fixed",
                value=latest.value if latest else None,
                load=router_down or _load_summary(role.pool, stats),
                decision=(latest.reason if latest else "-" if fixed_target(pool) is None
                          else f"fixed at {pool.min_replicas} (no autoscaling section)"),
                decided_at=latest.time if latest else None,
                last_change=change.reason if change else "-",
                changed_at=change.time if change else None))
    return dump, rows


def fixed_target(pool) -> int | None:
    """The size Serve holds a pool without autoscaling at (its
    min_replicas = max_replicas), or None for a pool the autoscaler sizes."""
    if pool.autoscaling is None and pool.min_replicas == pool.max_replicas:
        return pool.min_replicas
    return None


def _ago(t: float | None, now: float) -> str:
    return "" if t is None else f"{max(0.0, now - t):.0f}s ago: "


def format_status(name: str, rows: list[PoolStatus], now: float) -> str:
    """The table ``splitserve status`` prints."""
    header = ("POOL", "ROLE", "REPLICAS", "BOUNDS", "BOTTLENECK", "VALUE", "LOAD")
    table = [header] + [(
        r.app, r.role, f"{r.running}/{r.target if r.target is not None else '-'}",
        f"{r.min_replicas}-{r.max_replicas}", r.bottleneck,
        "-" if r.value is None else f"{r.value:.2f}", r.load) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"cluster {name}: {len(rows)} pool(s)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.append("")
    lines.append("autoscaling decisions:")
    for r in rows:
        lines.append(f"  {r.app}: {_ago(r.decided_at, now)}{r.decision}")
        if r.changed_at is not None:
            lines.append(f"  {' ' * len(r.app)}  last change {_ago(r.changed_at, now)}"
                         f"{r.last_change}")
    return "\n".join(lines)


def format_history(history: dict[str, list[Any]]) -> str:
    """``splitserve status --history``: per pool, time, running/target and why."""
    lines = []
    for app in sorted(history):
        lines.append(f"{app}:")
        for d in history[app]:
            stamp = time.strftime("%H:%M:%S", time.localtime(d.time)) + f"{d.time % 1:.1f}"[1:]
            lines.append(f"  {stamp}  {d.running}/{d.target}  {d.reason}")
    return "\n".join(lines) if lines else "no autoscaling decisions recorded"


def cmd_status(args) -> int:
    if not join_or_report(args.address):
        return 1
    if args.history:
        import msgspec

        history = _ledger_call("history")
        if history is None:
            print("no splitserve cluster deployed here (run `splitserve deploy CONFIG`)",
                  file=sys.stderr)
            return 1
        print(json.dumps(msgspec.to_builtins(history), indent=1) if args.json
              else format_history(history))
        return 0
    dump, rows = collect_status()
    if dump is None:
        print("no splitserve cluster deployed here (run `splitserve deploy CONFIG`)",
              file=sys.stderr)
        return 1
    import ray

    try:
        routes = collect_routes()
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ray.exceptions.GetTimeoutError) as e:
        # restarting for longer than status waits (its node lost): the pools still print
        print(f"routes: unknown, the route controller is unavailable ({type(e).__name__})",
              file=sys.stderr)
        routes = []
    if args.json:
        print(json.dumps({"pools": [asdict(r) for r in rows], "routes": routes}, indent=2))
    else:
        print(format_status(dump.get("name", "splitserve"), rows, time.time()))
        if routes:
            print()
            print(format_routes(routes, time.time()))
    return 0


def cmd_shutdown(args) -> int:
    if not join_or_report(args.address):
        return 1
    from splitserve.cluster.serve.app import serve_status, shutdown

    dump = _ledger_call("config")
    try:
        apps = sorted(serve_status().applications)
    except Exception:  # noqa: BLE001 - Serve not running here: no application to remove
        apps = []
    if dump is None and not apps:
        print("no splitserve cluster deployed here: nothing to remove", file=sys.stderr)
        return 1
    shutdown()
    if dump is not None:  # `status` then says nothing is deployed, not pools at 0 replicas
        import ray

        from splitserve.cluster.autoscaling.ledger import get_ledger

        ray.get(get_ledger().reset.remote())
    print(f"removed: {', '.join(apps) or 'no applications'}; the routers and the route "
          "controller. The Ray cluster keeps running (`ray stop` or `ray down` ends it).")
    return 0


def collect_routes() -> list[dict[str, Any]]:
    """Each route's status from the route controller (``RouteBook.status``)."""
    from splitserve.cluster.serve.route_actor import get_route_actor

    try:
        return _ask_actor(get_route_actor, "status")
    except ValueError:
        return []


def format_routes(routes: list[dict[str, Any]], now: float) -> str:
    """The routes part of ``splitserve status``."""
    lines = [f"routes: {len(routes)}"]
    for r in routes:
        split = ", ".join(f"{v['name']} {v['percent']:.1f}%" for v in r["variants"])
        lines.append(f"  {r['route']}: {split}")
        ramp = r.get("ramp")
        if ramp is None:
            continue
        steps = "/".join(f"{x:g}" for x in ramp["steps"])
        step = "0%" if ramp["step"] < 0 else f"step {ramp['step'] + 1} of {len(ramp['steps'])}"
        lines.append(f"    ramp of {ramp['variant']}: {ramp['status']}, {step} ({steps}%), "
                     f"{ramp['percent']:g}% now; requests this step: {ramp['requests']['new']} "
                     f"new, {ramp['requests']['baseline']} baseline")
        for g in ramp["guards"]:
            value = "-" if g["value"] is None else f"{g['value']:.3g}"
            verdict = {None: "not judged", True: "ok", False: "BREACH"}[g["ok"]]
            lines.append(f"      {g['name']}: {value} (max {g['limit']:.3g}) {verdict}")
        move = ramp.get("last_move")
        if move is not None:
            lines.append(f"    last move {_ago(move['at'], now)}{move['kind']} "
                         f"{move['from_percent']:g}% -> {move['to_percent']:g}%: {move['reason']}")
    return "\n".join(lines)
