"""A real local Ray cluster on loopback for integration tests."""

from __future__ import annotations

import contextlib
import os
import sys

import ray

# ray.init's errors when its GCS or raylet did not come up in time
_START_TIMEOUTS = ("Timed out waiting for file", "The current node timed out during startup")


@contextlib.contextmanager
def local_ray(num_cpus: int = 4, worker_setup_hook: str | None = None,
              metrics_report_interval_ms: int | None = None):
    """``worker_setup_hook``: "module.function" every worker process runs
    at start (fault injection in tests). ``metrics_report_interval_ms``: how
    often each Ray process exports its metrics to the node's agent (Ray's
    default is 10 s; Ray floors it at 1 s); a test that waits for exported
    values sets it shorter."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": {"PYTHONPATH": os.getcwd(), "SPLITSERVE_BIND_HOST": "127.0.0.1"}}
    if worker_setup_hook:
        runtime_env["worker_process_setup_hook"] = worker_setup_hook
    system_config = {}
    if metrics_report_interval_ms is not None:
        system_config["metrics_report_interval_ms"] = metrics_report_interval_ms
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=num_cpus, namespace="splitserve", include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=False, runtime_env=runtime_env,
                     _system_config=system_config or None)
            break
        except Exception as e:
            # Ray's GCS process once never came up (no log, no port file in
            # 30 s) on a loaded CI host, and once its raylet never registered
            # ("The current node timed out during startup"), each failing a
            # whole module's setup: start the runtime again, once; anything
            # else is a failure
            if attempt == 2 or not any(m in str(e) for m in _START_TIMEOUTS):
                raise
            print(f"ray.init failed ({e}); starting Ray again", file=sys.stderr)
            ray.shutdown()
    try:
        yield
    finally:
        from ray.serve import context as serve_context

        # the whole local cluster goes: ray.shutdown() ends every process of
        # it, Serve's included. serve.shutdown() first (deleting each
        # application, draining its replicas) would add ~4 s to every module
        # and check nothing; the driver's cached Serve client is dropped so
        # the next cluster's serve.start() finds that cluster's controller
        ray.shutdown()
        serve_context._disconnect()
