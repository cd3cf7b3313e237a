"""Model references -> local checkpoint directories.

A served model names either a directory (local disk, or shared storage that
every node mounts) or a Hugging Face repo id (``org/name``, optionally at a
``revision``). A repo id is resolved through ``huggingface_hub``: the
snapshot in the local Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``),
downloaded once per node when missing (``HF_TOKEN`` for gated repos), or,
with ``HF_HUB_OFFLINE=1``, only what the cache already holds. Only the files
the engine reads are fetched: configs, tokenizer files, chat templates and
safetensors weights.
"""

from __future__ import annotations

import re
from pathlib import Path

from splitserve.engine.errors import CheckpointError

# what the loader and the tokenizer read (engine/loader.py, engine/tokenizer.py)
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_repo_id(ref: str) -> bool:
    """Whether ``ref`` has the form of a Hugging Face repo id (``org/name``)."""
    return bool(_REPO_ID.match(ref)) and ".." not in ref


def resolve_checkpoint(ref: str | Path, revision: str | None = None) -> Path:
    """The local directory of checkpoint ``ref``: the directory itself, or
    the cached snapshot of a Hugging Face repo id. Raises ``CheckpointError``
    naming what to fix when neither exists or the download fails."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"{path}: a revision ({revision!r}) applies only to a Hugging "
                                  "Face repo id, not to a local directory")
        return path
    if path.is_file():  # e.g. an operator YAML given where a model belongs
        hint = (" (an operator YAML is for serve --config, deploy and simulate)"
                if path.suffix.lower() in (".yaml", ".yml") else "")
        raise CheckpointError(f"{path} is a file, not a checkpoint directory (a folder holding "
                              f"config.json, the tokenizer and *.safetensors){hint}")
    text = str(ref)
    if not is_repo_id(text):
        raise CheckpointError(f"checkpoint directory {path} does not exist (and {text!r} is not a "
                              "Hugging Face repo id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a dependency of the package
        raise CheckpointError(f"{text!r} looks like a Hugging Face repo id, but huggingface_hub "
                              "is not installed") from None
    try:
        local = snapshot_download(repo_id=text, revision=revision, allow_patterns=CHECKPOINT_FILES)
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{text!r} (revision {revision or 'main'}) is not in the local Hugging Face cache and "
            "cannot be downloaded (offline: HF_HUB_OFFLINE=1, or no network): download it on this "
            "node first, or serve a directory path") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{text!r}: download from the Hugging Face Hub failed: {e} "
                              "(gated or private repos need HF_TOKEN)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{text!r}: cannot resolve the checkpoint: {e}") from None
    return Path(local)
