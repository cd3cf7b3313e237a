"""The import direction of docs/architecture.md, enforced.

kernels <- engine <- handoff <- {prefill, decode}; handoff reaches the
engine only through its port (splitserve.engine.kv_port) and the plain data
and error modules listed in HANDOFF_ENGINE_ALLOWED; router imports neither
prefill nor decode nor torch (of the engine, only its torch-free modules:
hashing, stats, roles); prefill and
decode never import each other; engine and kernels never import Ray or a
higher layer. Every import of our own code goes through the one top-level
name, ``splitserve``.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("kernels", "engine", "handoff", "prefill", "decode", "router", "cluster")

# by folder: the splitserve sub-packages its files may not use
FORBIDDEN_LAYERS = {
    "kernels": {"engine", "handoff", "prefill", "decode", "router", "cluster"},
    "engine": {"handoff", "prefill", "decode", "router", "cluster"},
    "handoff": {"prefill", "decode", "router", "cluster"},
    "prefill": {"decode", "router", "cluster"},
    "decode": {"prefill", "router", "cluster"},
    "router": {"kernels", "handoff", "prefill", "decode", "cluster"},
    "cluster": set(),
}
# by folder: third-party top-level names its files may not use
FORBIDDEN_THIRD_PARTY = {
    "kernels": {"ray"},
    "engine": {"ray", "transformers"},
    "handoff": {"ray", "transformers"},
    "prefill": {"ray"},
    "decode": {"ray"},
    "router": {"torch", "ray", "triton"},
    "cluster": set(),
}
# the only engine modules the router may use (torch-free)
ROUTER_ENGINE_ALLOWED = {"splitserve.engine.hashing", "splitserve.engine.stats",
                         "splitserve.engine.roles"}
# the only engine modules the hand-off may use: the engine's KV port and plain
# data and errors, never the scheduler, block manager, runner or LLMEngine
HANDOFF_ENGINE_ALLOWED = {
    "splitserve.engine.kv_port",  # KVPort and the values it takes and returns
    "splitserve.engine.errors",  # the exceptions either side raises
    "splitserve.engine.outputs",  # RequestOutput: what an admitted sequence yields
    "splitserve.engine.sampling_params",  # SamplingParams: wire form and validation
    "splitserve.engine.auth",  # the constant-time check of the cluster token
}


def parse(path: Path) -> ast.Module:
    # CPython 3.11 keeps one AST-construction depth counter per interpreter:
    # an ast.parse racing AST work on another thread (threads earlier tests
    # in this process left running) can fail with a spurious SystemError
    # "AST constructor recursion depth mismatch" (python/cpython#106905);
    # parsing the same text again is the workaround
    text = path.read_text()
    for attempt in range(3):
        try:
            return ast.parse(text, str(path))
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def imports_of(path: Path) -> set[str]:
    tree = parse(path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def violations(pkg: str, name: str) -> list[str]:
    parts = name.split(".")
    if parts[0] in LAYERS:
        return [f"imports {name}: our code is imported as splitserve.{name}"]
    if parts[0] in FORBIDDEN_THIRD_PARTY[pkg]:
        return [f"imports {name}"]
    if parts[0] != "splitserve" or len(parts) < 2:
        return []
    if parts[1] in FORBIDDEN_LAYERS[pkg]:
        return [f"imports {name} (a higher layer)"]
    if pkg == "router" and parts[1] == "engine" and name not in ROUTER_ENGINE_ALLOWED:
        return [f"imports {name} (router may use only {sorted(ROUTER_ENGINE_ALLOWED)})"]
    if pkg == "handoff" and parts[1] == "engine" and name not in HANDOFF_ENGINE_ALLOWED:
        return [f"imports {name} (handoff may use only {sorted(HANDOFF_ENGINE_ALLOWED)})"]
    return []


@pytest.mark.parametrize("pkg", LAYERS)
def test_import_direction(pkg):
    bad = [f"{f.relative_to(ROOT)} {v}" for f in files(pkg) for name in imports_of(f)
           for v in violations(pkg, name)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ("tests", "benchmarks", "scripts"))
def test_tests_and_tools_use_the_namespace(folder):
    bad = [f"{f.relative_to(ROOT)} imports {name}" for f in sorted((ROOT / folder).rglob("*.py"))
           for name in imports_of(f) if name.split(".")[0] in LAYERS]
    assert not bad, "\n".join(bad)


def test_the_rules_catch_what_they_forbid():
    assert violations("engine", "splitserve.cluster.config")
    assert violations("router", "splitserve.engine.llm_engine")
    assert violations("decode", "engine.config")
    assert violations("router", "torch.nn")
    assert not violations("router", "splitserve.engine.hashing")
    assert not violations("router", "splitserve.engine.stats")
    assert not violations("cluster", "splitserve.prefill.worker")
    for private in ("splitserve.engine.llm_engine", "splitserve.engine.kv_manager",
                    "splitserve.engine.scheduler", "splitserve.engine.request_state",
                    "splitserve.engine"):
        assert violations("handoff", private), private
    for allowed in HANDOFF_ENGINE_ALLOWED:
        assert not violations("handoff", allowed), allowed
    assert not violations("decode", "splitserve.engine.llm_engine")


def test_a_handoff_file_reaching_into_the_engine_fails(tmp_path):
    """The rule as test_import_direction applies it to a file, imports
    inside functions included."""
    bad = tmp_path / "sneaky.py"
    bad.write_text("from splitserve.engine.kv_port import KVPort\n"
                   "from splitserve.engine.kv_manager import KVCacheManager\n\n"
                   "def f():\n    import splitserve.engine.llm_engine\n")
    found = sorted(name for name in imports_of(bad) if violations("handoff", name))
    assert found == ["splitserve.engine.kv_manager", "splitserve.engine.llm_engine"]


def test_required_layout():
    for d in LAYERS + ("deploy", "tests", "docs"):
        assert (ROOT / d).is_dir(), d
    assert (ROOT / "pyproject.toml").is_file()
    assert sorted(p.name for p in (ROOT / "splitserve").iterdir()
                  if p.name != "__pycache__") == ["__init__.py"]


@pytest.mark.parametrize("module", sorted(ROUTER_ENGINE_ALLOWED))
def test_engine_modules_the_router_uses_import_no_torch(module):
    """Importing one (and the router with it) loads neither torch nor Ray."""
    code = (f"import sys, {module}, splitserve.router.core, splitserve.router.reports; "
            "print(sorted(m for m in ('torch', 'ray', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_router_actor_process_imports_no_torch():
    """A router actor only places requests: its module (with the metrics it
    counts) loads no torch, which would cost each router ~2 s at start."""
    code = ("import sys, splitserve.cluster.serve.router_actor; "
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
