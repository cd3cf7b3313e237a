"""A real cluster under a real bench, driven through the CLI as a user would:
``splitserve serve --config FILE`` in the background until it prints that it
is ready, ``splitserve bench`` against it, then the cluster stopped (SIGINT,
then SIGKILL to its process group). The benchmarks that put a simulation or a
plan next to a measured run (benchmarks/sim_validate.py, plan_vs_real.py)
share it, so both measure the same way."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import splitserve
from splitserve.cluster.config import load_config

CLI = [sys.executable, "-m", "splitserve.cluster.cli.main"]


# Ray's workers listen on ports 10002-19999 (its min/max_worker_port defaults)
_ABOVE_RAY_WORKERS = 20000


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range, where outgoing
    connections take their local ports (32768 by default on Linux)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port free on ``ip`` now, for a cluster's endpoints. Chosen
    between Ray's worker ports and the kernel's ephemeral range, so that
    neither a Ray worker nor some process's outgoing connection takes it
    between this probe and the server's bind (a port the kernel hands out
    with bind(0) is an ephemeral one, and was once taken that way: the
    ingress then failed with "Failed to bind")."""
    low = _ephemeral_low()
    if low - _ABOVE_RAY_WORKERS < 1000:  # an unusual range: let the kernel choose
        with socket.socket() as s:
            s.bind((ip, 0))
            return s.getsockname()[1]
    for _ in range(200):
        port = random.randrange(_ABOVE_RAY_WORKERS, low)
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on {ip} in {_ABOVE_RAY_WORKERS}-{low - 1}")


def cli_env() -> dict[str, str]:
    """This process's environment, with the splitserve it runs importable by
    the CLI subprocesses (a source checkout is not installed) and Ray's
    token auth stated when this machine has a token."""
    env = dict(os.environ)
    if "RAY_AUTH_MODE" not in env and (Path.home() / ".ray" / "auth_token").exists():
        # Ray starts a local cluster with token auth when this token exists, but a
        # client joining it (splitserve status --address) only sends the token
        # when the mode is set: say it for both
        env["RAY_AUTH_MODE"] = "token"
    root = Path(splitserve.__file__).resolve().parents[1]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run_cli(args: list[str], timeout: float | None = None, capture: bool = False) -> str | None:
    """``splitserve ARGS``, echoed to stderr; raises when it fails. With
    ``capture``, returns its stdout (else it goes to this process's)."""
    print("$ splitserve " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(CLI + args, env=cli_env(), check=True, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None, text=capture)
    return done.stdout if capture else None


def _wait_ready(server: subprocess.Popen, start_timeout_s: float) -> str:
    """Echo ``splitserve serve``'s output until it is ready; returns the Ray
    address it prints with the ready message."""
    deadline = time.time() + start_timeout_s
    ready = False
    for line in server.stdout:
        sys.stderr.write(f"  [serve] {line}")
        ready = ready or line.startswith("ready in")
        if ready and line.strip().startswith("Ray:"):
            return line.split()[1]
        if time.time() > deadline:
            raise RuntimeError(f"the cluster did not start in {start_timeout_s:.0f} s")
    raise RuntimeError(f"splitserve serve exited ({server.wait()}) before it was ready")


def serve_and_bench(cfg_path: Path, record: Path, rates: str, num_requests: int | str,
                    input_len: str, output_len: str, seed: int,
                    start_timeout_s: float = 600.0, bench_timeout_s: float = 3600.0,
                    before_stop: Callable[[str], None] | None = None,
                    before_bench: Callable[[str], None] | None = None) -> None:
    """Serve ``cfg_path``, bench its first model at ``rates`` with the config's
    SLOs (``num_requests``: per run, or one count per rate: a load step)
    after ``before_bench`` got the HTTP URL (e.g. to probe the serving path),
    write the bench's JSON record to ``record``, call ``before_stop`` with
    the cluster's Ray address (to read what the cluster recorded, e.g.
    ``splitserve status --address ADDR --history``), stop the cluster."""
    cfg = load_config(cfg_path)
    server = subprocess.Popen(CLI + ["serve", "--config", str(cfg_path)], env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        address = _wait_ready(server, start_timeout_s)
        url = f"http://127.0.0.1:{cfg.endpoints.http_port}"
        if before_bench is not None:
            before_bench(url)
        run_cli(["bench", "--url", url, "--model",
                 cfg.models[0].model.name, "--rates", rates, "--num-requests", str(num_requests),
                 "--input-len", input_len, "--output-len", output_len, "--seed", str(seed),
                 "--ttft-slo", str(cfg.slo.ttft_s), "--tpot-slo", str(cfg.slo.tpot_s),
                 "--out", str(record), "--no-progress"], timeout=bench_timeout_s)
        if before_stop is not None:
            before_stop(address)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
