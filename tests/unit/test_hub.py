"""Model references: a directory is used as is; a Hugging Face repo id comes
from the node's Hugging Face cache (tested offline with a cache laid out as
huggingface_hub lays it out: no network here)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.engine.errors import CheckpointError
from splitserve.engine.hub import is_repo_id, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(hf_home: Path, repo_id: str, checkpoint: Path, revision: str = "main") -> Path:
    """The cache entry ``huggingface_hub`` writes when it downloads a repo."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    shutil.copytree(checkpoint, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(COMMIT)
    return snap


def offline_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("ref, ok", [("org/name", True), ("Qwen/Qwen3-0.6B", True),
                                     ("meta-llama/Llama-3.1-8B-Instruct", True),
                                     ("name", False), ("/abs/path", False), ("a/b/c", False),
                                     ("../x", False), ("org/..", False), ("", False)])
def test_repo_id_form(ref, ok):
    assert is_repo_id(ref) is ok


def test_a_directory_is_used_as_is(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="revision"):
        resolve_checkpoint(tmp_path, revision="v1")


def test_neither_directory_nor_repo_id_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*not a Hugging Face repo id"):
        resolve_checkpoint(tmp_path / "missing")


def test_a_file_is_named_as_a_file_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "cluster.yaml").write_text("models: []\n")
    assert is_repo_id("some/cluster.yaml")  # it has a repo id's form
    with pytest.raises(CheckpointError, match=r"some/cluster.yaml is a file, not a checkpoint "
                                              r"directory .*operator YAML is for serve --config"):
        resolve_checkpoint("some/cluster.yaml")


def run_offline(hf_home: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=offline_env(hf_home),
                          capture_output=True, text=True, timeout=120)


def test_repo_id_resolves_from_the_cache_offline(tmp_path, tiny_llama):
    snap = populate_cache(tmp_path / "hf", "tiny-org/tiny-llama", tiny_llama)
    out = run_offline(tmp_path / "hf", "from splitserve.engine.hub import resolve_checkpoint; "
                      "print(resolve_checkpoint('tiny-org/tiny-llama'))")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == snap.resolve()


def test_uncached_repo_id_offline_is_a_clear_error(tmp_path):
    (tmp_path / "hf").mkdir()
    out = run_offline(tmp_path / "hf", "from splitserve.engine.hub import resolve_checkpoint; "
                      "resolve_checkpoint('tiny-org/absent', revision='v9')")
    assert out.returncode != 0
    assert "CheckpointError" in out.stderr and "not in the local Hugging Face cache" in out.stderr
    assert "revision v9" in out.stderr


def test_generate_serves_a_repo_id_from_the_cache(tmp_path, tiny_llama):
    populate_cache(tmp_path / "hf", "tiny-org/tiny-llama", tiny_llama)
    out = subprocess.run(
        [sys.executable, "-m", "splitserve.cluster.cli.main", "generate", "--model",
         "tiny-org/tiny-llama", "--max-tokens", "4", "--json", "hello"],
        env=offline_env(tmp_path / "hf"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.splitlines()[0])
    assert len(row["token_ids"]) == 4
    assert "model=tiny-org/tiny-llama" in out.stderr
