"""A real multi-node Ray cluster on loopback: one head and worker nodes, each
a separate ``ray start`` carrying the custom resource of its node type.

Every node runs as ``ray start --block`` in its own process session, so
tearing the cluster down kills exactly the processes it started (the session's
process group), never another Ray instance sharing the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from tests.fixtures.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
# the driver (this test process) must use the same settings as the nodes:
# token auth would otherwise switch on wherever ~/.ray/auth_token exists
CLUSTER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_raylet_start_wait_time_s": "120"}


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


@dataclass
class NodeSpec:
    resources: dict[str, float]
    num_cpus: int = 1


@dataclass
class LocalCluster:
    """Head + workers on 127.0.0.1. ``address`` is the GCS address to pass
    to ``ray.init`` / ``RAY_ADDRESS``."""

    head: NodeSpec
    workers: list[NodeSpec] = field(default_factory=list)
    address: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)
    temp_dir: str = ""
    logs: list[Path] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The environment of every process of this cluster (and of a CLI run against it)."""
        env = dict(os.environ)
        # the Serve controller unpickles the autoscaling policy, which imports
        # cluster.*: every Ray process must find the repository
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.update(CLUSTER_ENV)
        env.pop("RAY_ADDRESS", None)
        return env

    def _start(self, args: list[str], name: str) -> None:
        log = Path(self.temp_dir) / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            p = subprocess.Popen([_ray_bin(), "start", "--block", "--disable-usage-stats",
                                  "--node-ip-address", "127.0.0.1", *args],
                                 stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                 cwd=str(ROOT), start_new_session=True)
        self.procs.append(p)

    def _common(self, spec: NodeSpec, head_flags: tuple[str, ...] = ()) -> list[str]:
        """A node's resources and ports: a range of 201 worker ports, and its
        other ports (``head_flags``' too) each chosen outside that range (Ray
        refuses to start a node whose object manager port, say, falls among
        its worker ports)."""
        lo = free_port()
        workers = range(lo, lo + 201)

        def single() -> int:
            for _ in range(100):
                port = free_port()
                if port not in workers:
                    return port
            raise RuntimeError(f"no free port outside the worker ports {lo}-{lo + 200}")

        ports = {flag: single() for flag in (
            "--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
            "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port",
            "--metrics-export-port", *head_flags)}
        return ["--num-cpus", str(spec.num_cpus), "--resources", json.dumps(spec.resources),
                *(a for flag, port in ports.items() for a in (flag, str(port))),
                "--min-worker-port", str(lo), "--max-worker-port", str(lo + 200),
                "--object-store-memory", str(200 << 20)]

    def start(self, timeout_s: float = 180.0, attempts: int = 3) -> "LocalCluster":
        """Start the head, then each worker in turn (concurrent starts time
        out on two loaded cores). A node that fails to start (a port taken
        between choosing and binding it) is started again on fresh ports."""
        self.temp_dir = tempfile.mkdtemp(prefix="ray_as_")

        def head() -> None:
            args = self._common(self.head, ("--port", "--ray-client-server-port"))
            self.address = f"127.0.0.1:{args[args.index('--port') + 1]}"
            self._start(["--head", "--include-dashboard", "false", "--temp-dir",
                         os.path.join(self.temp_dir, "t"), *args], "head")

        self._start_with_retries(head, attempts, timeout_s)
        for i, w in enumerate(self.workers):
            self._start_with_retries(
                lambda w=w, i=i: self._start(["--address", self.address, *self._common(w)],
                                             f"worker{i}"), attempts, timeout_s)
        return self

    def _start_with_retries(self, start, attempts: int, timeout_s: float) -> None:
        for attempt in range(attempts):
            start()
            try:
                self._wait_started(-1, timeout_s)
                return
            except RuntimeError:
                self._kill_session(self.procs.pop())
                if attempt == attempts - 1:
                    raise

    def _wait_started(self, i: int, timeout_s: float) -> None:
        """``ray start`` prints this line once its node has registered."""
        p, log = self.procs[i], self.logs[i]
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if p.poll() is not None:
                raise RuntimeError(f"ray start exited ({p.returncode}); the end of {log}:\n"
                                   f"{log.read_text(errors='replace')[-1500:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray node {log.stem} not up after {timeout_s:.0f}s")
            time.sleep(0.5)

    def _session_pids(self, sids: set[int] | None = None) -> list[int]:
        """Every live process in the sessions of the nodes started here (Ray's
        workers set their own process group but stay in the session)."""
        sids = {p.pid for p in self.procs} if sids is None else sids
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            # fields after the ")" closing the command name: state ppid pgrp session
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) in sids:
                out.append(int(d.name))
        return out

    def kill_node(self, i: int) -> None:
        """Lose node ``i`` (0: the head) at once: its raylet and every worker
        on it, SIGKILLed, as a host crash or a reclaimed spot node."""
        self._kill_session(self.procs[i])

    def add_worker(self, spec: NodeSpec, timeout_s: float = 180.0, attempts: int = 3) -> None:
        """Start one more worker node of ``spec`` (a lost node coming back)."""
        n = len(self.procs)
        self._start_with_retries(
            lambda: self._start(["--address", self.address, *self._common(spec)], f"worker{n}"),
            attempts, timeout_s)

    def _kill_session(self, p: subprocess.Popen) -> None:
        for pid in self._session_pids({p.pid}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait()

    def stop(self, grace_s: float = 5.0) -> None:
        """Kill every process this cluster started, and only those."""
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self._session_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self._session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()
        self.procs.clear()
        if not os.environ.get("KEEP_RAY_LOGS"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def running(cluster: LocalCluster):
    """``cluster`` started with ``CLUSTER_ENV`` set in this process too (the
    driver must use the nodes' settings); on exit the driver disconnects,
    every node of the cluster stops (Serve with them, as in
    ``ray_cluster.local_ray``) and the environment is restored."""
    import ray
    from ray.serve import context as serve_context

    from ray._raylet import Config

    saved = {k: os.environ.get(k) for k in CLUSTER_ENV}
    os.environ.update(CLUSTER_ENV)
    # Ray caches the auth mode this process last read from RAY_AUTH_MODE
    # (token, after an earlier local ray.init here): read it again, both
    # ways, or the driver and the cluster disagree on sending a token
    Config.initialize("")
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
                serve_context._disconnect()
        finally:
            cluster.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            # (a later local ray.init that finds RAY_AUTH_MODE set does not
            # read it again: its driver would send no token to its GCS)
            Config.initialize("")
