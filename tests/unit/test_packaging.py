"""What `pip install` puts on a machine: every code package under its
import name, the data files the engine reads at run time, and no module
that shadows another distribution's (kernels/ is ``splitserve_kernels``;
the bare name ``kernels`` is Hugging Face's package, which transformers
imports)."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
CODE_DIRS = ("kernels", "engine", "prefill", "decode", "router", "cluster")


def package_dir(name: str) -> Path:
    top, _, rest = name.partition(".")
    base = SETUPTOOLS.get("package-dir", {}).get(top, top)
    return ROOT / base / rest.replace(".", "/")


def import_name(directory: Path) -> str:
    rel = directory.relative_to(ROOT).parts
    mapped = {v: k for k, v in SETUPTOOLS.get("package-dir", {}).items()}
    return ".".join((mapped.get(rel[0], rel[0]),) + rel[1:])


def test_every_code_directory_is_a_listed_package():
    listed = set(SETUPTOOLS["packages"])
    on_disk = {import_name(p.parent) for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert {n for n in listed if not package_dir(n).is_dir()} == set()


def test_every_data_file_is_package_data():
    data = SETUPTOOLS["package-data"]
    missing = []
    for d in CODE_DIRS:
        for f in (ROOT / d).rglob("*"):
            if f.is_dir() or f.suffix in (".py", ".pyc", ".sh") or "__pycache__" in f.parts:
                continue
            globs = data.get(import_name(f.parent), [])
            if not any(f.match(g) for g in globs):
                missing.append(str(f.relative_to(ROOT)))
    assert missing == [], "add these to [tool.setuptools.package-data]"


def test_kernels_does_not_shadow_hugging_face_kernels():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    # from the source tree (on sys.path first), the bare name is never ours
    out = subprocess.run(
        [sys.executable, "-c",
         "import kernels, splitserve_kernels.reference as r; "
         "print(getattr(kernels, '__file__', None)); print(r.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    assert not out[0].startswith(str(ROOT / "kernels")), out[0]
    assert out[1].startswith(str(ROOT / "kernels")), out[1]


def test_wheel_holds_packages_and_data(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building the wheel needs setuptools >= 77 in this environment")
    src = tmp_path / "src"  # setuptools builds inside the tree: keep ours clean
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "__pycache__", "*.egg-info", ".splitserve", "bench-results"))
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, env=env, capture_output=True,
                   cwd=tmp_path)
    (wheel,) = tmp_path.glob("splitserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in ("splitserve_kernels/reference.py", "splitserve_kernels/triton/rmsnorm.py",
                 "engine/default_corpus.txt", "engine/transfer/kv_transfer.proto",
                 "cluster/proto/splitserve.proto", "cluster/cli.py"):
        assert want in names, want
    assert not any(n.startswith("kernels/") for n in names)
