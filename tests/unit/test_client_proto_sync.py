"""The checked-in client API modules are exactly what scripts/gen_protos.sh
generates from the .proto files: regenerate into a temporary folder and
compare byte for byte."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "cluster" / "api" / "proto"
GENERATED = [f"{stem}{suffix}" for stem in ("splitserve_pb2", "health_pb2")
             for suffix in (".py", ".pyi")] + ["splitserve_pb2_grpc.py", "health_pb2_grpc.py"]


def test_generated_modules_match_the_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env,
                   capture_output=True, timeout=120)
    out = tmp_path / "cluster" / "api" / "proto"
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".proto") == sorted(GENERATED)
    for name in GENERATED:
        assert (out / name).read_bytes() == (PROTO_DIR / name).read_bytes(), (
            f"cluster/api/proto/{name} is stale: run scripts/gen_protos.sh")


def test_generated_modules_import_as_a_package():
    from splitserve.cluster.api.proto import health_pb2_grpc, splitserve_pb2, splitserve_pb2_grpc

    assert splitserve_pb2.DESCRIPTOR.package == "splitserve.v1"
    assert splitserve_pb2_grpc.GenerationStub and health_pb2_grpc.HealthStub
    services = {s.full_name for s in splitserve_pb2.DESCRIPTOR.services_by_name.values()}
    assert services == {"splitserve.v1.Generation"}
    from splitserve.cluster.api.proto import health_pb2

    assert health_pb2.DESCRIPTOR.services_by_name["Health"].full_name == "grpc.health.v1.Health"
