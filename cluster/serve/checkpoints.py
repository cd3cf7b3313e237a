"""Where a served model's checkpoint lives on this node: the one place the
ingress and the worker replicas turn a ``ModelSpec`` into a directory (the
embedded default model, a local or shared-storage path, or a Hugging Face
repo id resolved through the node's cache), and the model's chat template
override."""

from __future__ import annotations

from pathlib import Path

from splitserve.cluster.config import ModelSpec


def checkpoint_dir(spec: ModelSpec) -> Path:
    """The checkpoint directory of ``spec`` on this node (downloads a Hugging
    Face repo id into the node's cache once, unless offline)."""
    if spec.path is None:
        from splitserve.engine.default_model import default_model_path

        return default_model_path()
    from splitserve.engine.hub import resolve_checkpoint

    return resolve_checkpoint(spec.path, spec.revision)


def chat_template_override(spec: ModelSpec) -> str | None:
    """The operator's chat template for ``spec``: a file's text when
    ``chat_template`` names an existing file, else the value itself when it
    is a Jinja template; None keeps the checkpoint's."""
    value = spec.chat_template
    if value is None:
        return None
    p = Path(value).expanduser()
    if "\n" not in value and len(value) < 4096 and p.is_file():
        return p.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template: {value!r} is neither a file on this node nor a Jinja template")
