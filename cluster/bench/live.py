"""A real cluster under a real bench, driven through the CLI as a user would:
``splitserve serve --config FILE`` in the background until it prints that it
is ready, ``splitserve bench`` against it, then the cluster stopped (SIGINT,
then SIGKILL to its process group). The benchmarks that put a simulation or a
plan next to a measured run (benchmarks/sim_validate.py, plan_vs_real.py)
share it, so both measure the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import splitserve
from splitserve.cluster.config import load_config

CLI = [sys.executable, "-m", "splitserve.cluster.cli.main"]


def cli_env() -> dict[str, str]:
    """This process's environment, with the splitserve it runs importable by
    the CLI subprocesses (a source checkout is not installed)."""
    env = dict(os.environ)
    root = Path(splitserve.__file__).resolve().parents[1]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run_cli(args: list[str], timeout: float | None = None) -> None:
    """``splitserve ARGS``, echoed to stderr; raises when it fails."""
    print("$ splitserve " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(CLI + args, env=cli_env(), check=True, timeout=timeout)


def serve_and_bench(cfg_path: Path, record: Path, rates: str, num_requests: int,
                    input_len: str, output_len: str, seed: int,
                    start_timeout_s: float = 600.0, bench_timeout_s: float = 3600.0) -> None:
    """Serve ``cfg_path``, bench its first model at ``rates`` with the config's
    SLOs, write the bench's JSON record to ``record``, stop the cluster."""
    cfg = load_config(cfg_path)
    server = subprocess.Popen(CLI + ["serve", "--config", str(cfg_path)], env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + start_timeout_s
        for line in server.stdout:
            sys.stderr.write(f"  [serve] {line}")
            if line.startswith("ready in"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"the cluster did not start in {start_timeout_s:.0f} s")
        else:
            raise RuntimeError(f"splitserve serve exited ({server.wait()}) before it was ready")
        run_cli(["bench", "--url", f"http://127.0.0.1:{cfg.endpoints.http_port}", "--model",
                 cfg.models[0].model.name, "--rates", rates, "--num-requests", str(num_requests),
                 "--input-len", input_len, "--output-len", output_len, "--seed", str(seed),
                 "--ttft-slo", str(cfg.slo.ttft_s), "--tpot-slo", str(cfg.slo.tpot_s),
                 "--out", str(record), "--no-progress"], timeout=bench_timeout_s)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
