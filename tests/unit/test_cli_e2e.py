"""``splitserve`` run as a user runs it: a separate process, from a scratch
directory, with fresh files. Bad input ends in one line on stderr and a
non-zero status; Ctrl-C ends a long command with one line, status 130 and
no partial output."""

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_CFG = ROOT / "deploy" / "configs" / "gpu-llama3-8b.yaml"


def _run_env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _splitserve(*argv, cwd):
    return subprocess.Popen([sys.executable, "-m", "splitserve.cluster.cli.main", *map(str, argv)],
                            cwd=cwd, env=_run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_bad_trace_line_is_one_message_and_status_2(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 64, "output_length": 8}\n'
                     '{"timestamp": 10, "input_length": "many", "output_length": 8}\n')
    p = _splitserve("simulate", "--config", GPU_CFG, "--shape", "llama-3.1-8b", "--hardware",
                    "h100-sxm", "--trace", "trace.jsonl", "--db", "fresh/profiles.db",
                    "--out", "sim", cwd=tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert err == ("error: trace.jsonl line 2: 'input_length' must be an integer >= 1, "
                   "got 'many'\n")
    assert out == "" and not (tmp_path / "sim").exists()


@pytest.mark.slow
def test_ctrl_c_during_simulate_exits_130_without_output(tmp_path):
    # far more requests than fit in the test: it is interrupted mid-run
    p = _splitserve("simulate", "--config", GPU_CFG, "--shape", "llama-3.1-8b", "--hardware",
                    "h100-sxm", "--rate", "50", "--num-requests", "5000000", "--progress",
                    "--db", "fresh/profiles.db", "--out", "sim", cwd=tmp_path)
    fd = p.stderr.fileno()
    seen = ""
    deadline = time.monotonic() + 120
    while "simulated" not in seen and time.monotonic() < deadline:  # the progress line: running
        if select.select([fd], [], [], 0.2)[0]:
            seen += os.read(fd, 65536).decode(errors="replace")
        assert p.poll() is None, seen
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, seen + err
    assert "Traceback" not in seen + err
    assert err.strip().endswith("splitserve simulate: interrupted")
    assert not (tmp_path / "sim").exists()
