"""The checked-in generated modules are what scripts/gen_protos.sh makes of the proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("kv_transfer_pb2.py", "kv_transfer_pb2_grpc.py")


@pytest.mark.timeout(60)
def test_generated_modules_are_in_sync_with_the_proto(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)],
                   check=True, env=env, capture_output=True)
    for name in GENERATED:
        fresh = (tmp_path / "handoff/transfer" / name).read_text()
        checked_in = (ROOT / "handoff/transfer" / name).read_text()
        assert fresh == checked_in, f"{name} is stale: run scripts/gen_protos.sh"
