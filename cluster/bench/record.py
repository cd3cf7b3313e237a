"""Benchmark records: what ran, where, and the JSON file it is written to.

Every record ``splitserve bench`` and the scripts in benchmarks/ write opens
with the same header: the benchmark's name, the UTC time, the command line,
the git revision and a description of the machine. ``write_json`` writes a
record with NaN (no data for a statistic) as null and infinities as the
strings "inf" / "-inf", so strict JSON readers accept every record.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable


def machine() -> dict[str, Any]:
    """Python, platform, CPU count and model, torch's version and threads,
    and the first GPU, where there are any."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        model = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in l]
        info["cpu"] = model[0].split(":", 1)[1].strip() if model else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def git_rev() -> str:
    """The short revision of the checkout in the working directory, or "unknown"."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """How this process was started: ``python3 benchmarks/x.py --out ...`` for
    a script, ``splitserve bench ...`` for the console command."""
    if sys.argv[0].endswith(".py"):
        return " ".join([Path(sys.executable).name] + sys.argv)
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:])


def record_header(name: str) -> dict[str, Any]:
    """The fields every record opens with."""
    return {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command_line(), "git": git_rev(), "machine": machine()}


def write_json(path: str | Path, rec: dict[str, Any],
               default: Callable[[Any], Any] | None = None) -> None:
    """Write ``rec`` to ``path`` (its folder made if need be); ``default``
    as for ``json.dumps``, for values JSON has no type for."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_nan_to_none(rec), indent=2, default=default)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.partial")
    try:  # a reader (or an interrupted run) sees the old file or the whole new one
        tmp.write_text(text)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def print_and_dump(shown: dict[str, Any], rec: dict[str, Any], path: str | Path | None) -> None:
    """Print ``shown`` as JSON; write ``rec`` as JSON to ``path`` unless it is None."""
    print(json.dumps(shown, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(rec, f, indent=1)


def write_record(path: str | Path | None, name: str, results: dict[str, Any]) -> dict[str, Any]:
    """The header and ``results`` as one record, written to ``path`` unless it is None."""
    rec = {**record_header(name), "results": results}
    if path:
        write_json(path, rec)
    return rec


def _nan_to_none(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x
