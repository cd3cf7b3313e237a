"""The small JSON files of a Hugging Face checkpoint directory (config.json,
generation_config.json, tokenizer_config.json, the safetensors index).

Every problem is a ``CheckpointError`` whose message names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from splitserve.engine.errors import CheckpointError


def read_json(path: Path, what: str, required: bool = True) -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` names it in errors); an optional
    file that is absent reads as ``{}``."""
    if not path.is_file():
        if not required:
            return {}
        raise CheckpointError(f"{path.parent}: {what} {path.name} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
