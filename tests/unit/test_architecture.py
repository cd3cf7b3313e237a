"""The import direction of docs/architecture.md, enforced.

kernels <- engine <- {prefill, decode}; router imports neither prefill nor
decode nor torch (only engine.hashing); prefill and decode never import each
other; engine and kernels never import Ray or a higher layer.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "engine", "prefill", "decode", "router", "cluster")
KERNELS = "splitserve_kernels"  # kernels/'s import name

# by directory: the top-level import names its files may not use ("kernels"
# would be Hugging Face's package, never ours)
FORBIDDEN = {
    "kernels": {"ray", "engine", "prefill", "decode", "router", "cluster", "kernels"},
    "engine": {"ray", "prefill", "decode", "router", "cluster", "transformers", "kernels"},
    "prefill": {"decode", "router", "cluster", "kernels"},
    "decode": {"prefill", "router", "cluster", "kernels"},
    "router": {"torch", "ray", "prefill", "decode", "cluster", KERNELS, "kernels", "triton"},
    "cluster": {"kernels"},
}
# the only engine modules the router may use (torch-free)
ROUTER_ENGINE_ALLOWED = {"engine.hashing"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_import_direction(pkg):
    bad = []
    for f in files(pkg):
        for name in imports_of(f):
            top = name.split(".")[0]
            if top in FORBIDDEN[pkg]:
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
            if pkg == "router" and top == "engine" and name not in ROUTER_ENGINE_ALLOWED:
                bad.append(f"{f.relative_to(ROOT)} imports {name} (router may use only engine.hashing)")
    assert not bad, "\n".join(bad)


def test_required_layout():
    for d in ("kernels", "engine", "prefill", "decode", "router", "cluster", "deploy", "tests", "docs"):
        assert (ROOT / d).is_dir(), d
    assert (ROOT / "pyproject.toml").is_file()
