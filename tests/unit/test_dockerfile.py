"""deploy/docker/Dockerfile, which cannot be built here (no Docker, no
network): its base is the Ray image of the Ray version the lock file pins
(and pyproject allows, and the RayService runs); its first stage builds the
wheel the way tests/unit/test_packaging.py does, from sources that, copied
as the stage copies them, build a wheel holding every package; its last
stage installs that wheel with the locked dependencies; and the RayService
runs the image under the name docs/operators.md tells operators to build
and push."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RAY_IMAGE = re.compile(r"rayproject/ray:(?P<version>[0-9.]+)-py(?P<py>3\d+)(-\w+)?")


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions per stage (the ARGs before the first
    FROM make stage 0), as (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, args = line.partition(" ")
        if word.upper() == "FROM":
            out.append([])
        out[-1].append((word.upper(), " ".join(args.split())))
    return out


def locked(name: str) -> str:
    lock = (ROOT / "constraints" / "lock.txt").read_text()
    return re.search(rf"^{re.escape(name)}==(\S+)$", lock, re.M).group(1)


def base_image() -> str:
    (arg,) = [a for i, a in stages()[0] if i == "ARG" and a.startswith("RAY_IMAGE=")]
    return arg.split("=", 1)[1]


def test_the_base_is_the_ray_image_of_the_pinned_ray_version():
    m = RAY_IMAGE.fullmatch(base_image())
    assert m, base_image()
    ray = locked("ray")
    assert m["version"] == ray
    (req,) = [Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray")]
    assert req.specifier.contains(ray) and "serve" in req.extras
    assert f"3.{m['py'][1:]}" in Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier
    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray
    froms = [s[0][1] for s in stages()[1:]]
    assert froms == ["${RAY_IMAGE} AS wheel", "${RAY_IMAGE}"]


def _wheel_run() -> str:
    (run,) = [a for i, a in stages()[1] if i == "RUN" and " wheel " in f" {a} "
              and "pip wheel" in a]
    return run


def test_the_wheel_is_built_as_the_packaging_test_builds_it():
    packaging_test = (ROOT / "tests" / "unit" / "test_packaging.py").read_text()
    assert '"pip", "wheel", "-q", "--no-deps", "--no-build-isolation"' in packaging_test
    words = shlex.split(_wheel_run())
    assert words[:4] == ["python", "-m", "pip", "wheel"] and words[-1] == "."
    assert {"--no-deps", "--no-build-isolation"} <= set(words)
    # the build backend the packaging test needs is installed first
    setup = [a for i, a in stages()[1] if i == "RUN"][0]
    assert '"setuptools>=77"' in setup and PYPROJECT["build-system"]["requires"][0] == "setuptools>=77"


def _copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of the stage's COPY instructions from the context."""
    out = []
    for instr, args in stage:
        words = [w for w in shlex.split(args) if not w.startswith("--chown")]
        if instr == "COPY" and not any(w.startswith("--from") for w in words):
            out.append((words[:-1], words[-1]))
    return out


def test_the_copied_sources_build_a_wheel_holding_every_package(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building the wheel needs setuptools >= 77 in this environment")
    workdir = [a for i, a in stages()[1] if i == "WORKDIR"][0]
    src = tmp_path / "src"
    src.mkdir()
    for sources, dest in _copies(stages()[1]):
        target = src / Path(dest).relative_to(".") if not dest.startswith("/") else None
        assert target is not None, f"COPY to {dest}: the stage copies into its WORKDIR {workdir}"
        for s in sources:
            path = ROOT / s
            to = target / path.name if dest.endswith("/") or len(sources) > 1 else target
            if path.is_dir():
                shutil.copytree(path, to, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, to)
    words = shlex.split(_wheel_run())
    out = tmp_path / "dist"
    words[words.index("-w") + 1] = str(out)
    subprocess.run([sys.executable, *words[1:]], cwd=src, check=True, capture_output=True,
                   env={**os.environ, "PIP_NO_INDEX": "1"})
    (wheel,) = out.glob("splitserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        folder = package.replace(".", "/") + "/"
        assert any(n.startswith(folder) for n in names), package
    for data in ("splitserve/engine/default_corpus.txt", "splitserve/cluster/api/proto/splitserve.proto",
                 "splitserve/handoff/transfer/kv_transfer.proto"):
        assert data in names


def test_the_image_installs_that_wheel_with_the_locked_dependencies():
    final = stages()[2]
    (from_wheel,) = [a for i, a in final if i == "COPY" and "--from=wheel" in a]
    wheel_dir = shlex.split(_wheel_run())[shlex.split(_wheel_run()).index("-w") + 1]
    assert shlex.split(from_wheel)[-2].rstrip("/") == wheel_dir
    copied = {s: dest for sources, dest in _copies(final) for s in sources}
    assert set(copied) == {"constraints/lock.txt", "constraints/cpu.txt"}
    (install,) = [a for i, a in final if i == "RUN" and "pip install" in a]
    pip = shlex.split(install.split("&&")[1])
    assert pip[:4] == ["python", "-m", "pip", "install"]
    assert pip[-1] == shlex.split(from_wheel)[-1] + "splitserve-*.whl"
    assert "-e" not in pip and "." not in pip  # the wheel, never the source tree
    constraints = [pip[k + 1] for k, w in enumerate(pip) if w == "-c"]
    assert copied["constraints/cpu.txt"] in constraints
    # the lock file, less triton (which follows the CUDA build of torch)
    assert f"grep -v '^triton==' {copied['constraints/lock.txt']} > {constraints[0]}" in install
    assert "ray.__version__" in install and "s/^ray==//p" in install  # checked in the image


def test_the_build_context_lets_the_copied_paths_through():
    lines = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p.strip().rstrip("/") for p in lines if p.strip() and not p.startswith("#")]
    assert patterns[0] == "**"  # everything else is left out (.venv, .git, bench results)
    kept = {p[1:] for p in patterns if p.startswith("!")}
    for stage in stages()[1:]:
        for sources, _ in _copies(stage):
            for s in sources:
                assert kept & {s, *map(str, Path(s).parents)}, s


def test_the_rayservice_runs_the_image_the_docs_build_and_push():
    service = (ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text()
    images = set(re.findall(r"image:\s*(\S+)", service))
    assert len(images) == 1, images
    (image,) = images
    assert image.endswith(f"/splitserve:{PYPROJECT['project']['version']}")
    guide = (ROOT / "docs" / "operators.md").read_text()
    assert f"docker build -f deploy/docker/Dockerfile -t {image} ." in guide
    assert f"docker push {image}" in guide
    assert f"-t {image} ." in DOCKERFILE.read_text()  # its header says the same
