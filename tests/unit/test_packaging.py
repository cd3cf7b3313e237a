"""What `pip install` puts on a machine: one top-level name, ``splitserve``,
with every code folder under it (``splitserve.engine`` is engine/, ...), the
data files the engine reads at run time, and no module that shadows another
distribution's (the bare names ``engine``, ``router``, ``cluster``,
``decode``, ``kernels`` belong to other PyPI distributions)."""

import fnmatch
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
CODE_DIRS = ("kernels", "engine", "handoff", "prefill", "decode", "router", "cluster")
PACKAGE_DIR = SETUPTOOLS["package-dir"]


def package_dir(name: str) -> Path:
    """The folder setuptools builds package ``name`` from (longest mapped prefix)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        base = PACKAGE_DIR.get(".".join(parts[:k]))
        if base is not None:
            return ROOT / base / "/".join(parts[k:])
    return ROOT / "/".join(parts)


def import_name(directory: Path) -> str:
    rel = directory.relative_to(ROOT).parts
    mapped = {v: k for k, v in PACKAGE_DIR.items()}
    return ".".join((mapped[rel[0]],) + rel[1:])


def test_every_code_directory_is_a_listed_package():
    listed = set(SETUPTOOLS["packages"])
    on_disk = {import_name(p.parent) for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")}
    assert {n.split(".")[0] for n in listed} == {"splitserve"}
    assert set(PACKAGE_DIR) == {"splitserve"} | {f"splitserve.{d}" for d in CODE_DIRS}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert {n for n in listed if not package_dir(n).is_dir()} == set()


def test_every_data_file_is_package_data():
    data = SETUPTOOLS["package-data"]
    listed = set(SETUPTOOLS["packages"])
    missing = []
    for d in CODE_DIRS:
        for f in (ROOT / d).rglob("*"):
            if f.is_dir() or f.suffix in (".py", ".pyc", ".sh") or "__pycache__" in f.parts:
                continue
            owner = f.parent  # data in a plain subfolder belongs to the package above it
            while import_name(owner) not in listed:
                owner = owner.parent
            globs = data.get(import_name(owner), [])
            if not any(fnmatch.fnmatch(f.relative_to(owner).as_posix(), g) for g in globs):
                missing.append(str(f.relative_to(ROOT)))
    assert missing == [], "add these to [tool.setuptools.package-data]"


def test_kernels_does_not_shadow_hugging_face_kernels():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    # from the source tree (on sys.path first), the bare name is never ours
    out = subprocess.run(
        [sys.executable, "-c",
         "import kernels, splitserve.kernels.reference as r; "
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
    for want in ("splitserve/__init__.py", "splitserve/kernels/reference.py",
                 "splitserve/kernels/triton/rmsnorm.py", "splitserve/engine/default_corpus.txt",
                 "splitserve/engine/default_model/heldout.txt",
                 "splitserve/engine/default_model/default-model-v2/model.safetensors",
                 "splitserve/engine/default_model/default-draft-v2/tokenizer_config.json",
                 "splitserve/handoff/transfer/kv_transfer.proto",
                 "splitserve/cluster/api/proto/splitserve.proto", "splitserve/cluster/cli/main.py"):
        assert want in names, want
    assert {n.split("/")[0] for n in names} == {"splitserve", wheel.name.split("-")[0] + "-"
                                                + wheel.name.split("-")[1] + ".dist-info"}
    # installed outside the source tree, only `splitserve` is ours
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), str(wheel)], check=True, capture_output=True)
    probe = ("import importlib.util as u, splitserve.engine.hashing as h, splitserve; "
             "print(h.__file__); print(len(splitserve.__path__)); "
             "print([n for n in ('engine', 'router', 'cluster', 'decode', 'prefill', 'handoff') "
             "if (s := u.find_spec(n)) and str(s.origin or '').startswith(%r)])" % str(site))
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); "
                          + probe], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0].startswith(str(site / "splitserve" / "engine")), out
    assert out[1] == "1", out  # no source-tree search path in an install
    assert out[2] == "[]", out
