"""Who an adapter is, and what of its ``adapter_config.json`` is served.

An ``AdapterRef`` names an adapter (the model name clients ask for), where
its files are (a PEFT folder: adapter_config.json + adapter_model.safetensors,
on every node that serves it) and the digest of those files. The digest is
its identity: engines key their caches by it, it seeds the adapter's
prefix-cache hash chain (``splitserve.engine.hashing.adapter_root_hash``),
and an engine loading from the path checks it, so a folder rewritten under
the same name is never mistaken for the adapter the cluster registered.

``parse_adapter_config`` reads PEFT's config: ``r``, ``lora_alpha``,
``use_rslora``, ``rank_pattern`` / ``alpha_pattern`` (matched against module
names as PEFT matches them) and ``target_modules``. Features the engine
does not implement are refused with ``AdapterError`` naming the field
(``param``): DoRA, biases, modules_to_save, embedding or lm_head LoRA,
trainable tokens, expert parameters, and the other PEFT variants below.
``fan_in_fan_out`` (PEFT sets it on GPT-2's Conv1D projections) is served:
it transposes only a merged delta; lora_A / lora_B are [r, in] / [out, r]
either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.engine.errors import AdapterError, AdapterUnavailableError, UnknownAdapterError
from splitserve.engine.hashing import adapter_root_hash

__all__ = ["AdapterConfig", "AdapterError", "AdapterRef", "AdapterUnavailableError",
           "UnknownAdapterError", "describe_adapter", "parse_adapter_config"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Projections a LoRA may target: attention and the dense MLP (not MoE experts or routers).
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class AdapterRef:
    """One adapter as requests carry it."""

    name: str
    path: str
    digest: str  # sha256 (hex) of adapter_config.json and adapter_model.safetensors

    @property
    def key(self) -> str:
        """What caches key it by: equal files are one adapter."""
        return self.digest

    @property
    def hash_root(self) -> int:
        """The parent of its prompts' first block hash (the base model's is 0)."""
        return adapter_root_hash(self.digest)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or name != name.strip():
        raise AdapterError(f"adapter name {name!r} must be 1 to {MAX_NAME_CHARS} characters "
                           "without leading or trailing spaces", param="lora_name")
    return name


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """(config, weights) of the PEFT folder ``path``; AdapterError if either is missing."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"adapter path {str(path)!r} is not a directory", param="lora_path")
    cfg, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
    for f in (cfg, weights):
        if not f.is_file():
            hint = " (only safetensors weights are read)" if f is weights else ""
            raise AdapterError(f"adapter path {str(path)!r} has no {f.name}{hint}",
                               param="lora_path")
    return cfg, weights


def file_digest(path: str | Path) -> str:
    """The digest of the adapter's two files (reads them whole, in chunks)."""
    h = hashlib.sha256()
    for f in adapter_files(path):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def describe_adapter(name: str, path: str | Path) -> AdapterRef:
    """The ``AdapterRef`` of the PEFT folder ``path`` served as ``name``."""
    return AdapterRef(check_name(name), str(Path(path).resolve()), file_digest(path))


# -- adapter_config.json -------------------------------------------------------------
# Fields that switch on (when truthy) a PEFT feature the engine does not
# implement: field -> what it is
_REFUSED: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained modules saved beside the LoRA",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "LoRA on parameters (MoE expert weights)",
    "layer_replication": "replicated layers",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "megatron_config": "Megatron-parallel LoRA layers",
}


def _match_pattern(patterns: dict[str, Any], module: str) -> Any:
    """The value of the first pattern that matches ``module`` as PEFT matches
    rank_pattern / alpha_pattern keys (a suffix of the module name, a regex
    allowed); None if none does."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """What the engine uses of a PEFT LoRA config."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank_of(self, module: str) -> int:
        """The rank PEFT gives ``module`` (e.g. model.layers.0.self_attn.q_proj)."""
        r = _match_pattern(self.rank_pattern, module)
        return int(self.r if r is None else r)

    def scaling_of(self, module: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA, with the module's own
        rank and alpha where the patterns set them."""
        alpha = _match_pattern(self.alpha_pattern, module)
        alpha = float(self.lora_alpha if alpha is None else alpha)
        r = self.rank_of(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _target_names(targets: Any) -> list[str]:
    if targets is None:
        return []
    if isinstance(targets, str):  # "all-linear" or one regex over full module names
        return [] if targets == "all-linear" else [targets]
    if isinstance(targets, (list, tuple, set)) and all(isinstance(t, str) for t in targets):
        return list(targets)
    raise AdapterError(f"target_modules must be a list of module names or a string, got "
                       f"{targets!r}", param="target_modules")


def parse_adapter_config(data: dict[str, Any], source: str = CONFIG_FILE) -> AdapterConfig:
    """Check a PEFT adapter_config.json and return what the engine uses."""
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{source}: peft_type {peft_type!r} is not served; only LORA adapters "
                           "are", param="peft_type")
    bias = data.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"{source}: bias {bias!r} is not served: adapters that train biases "
                           "change the base model's biases; only bias 'none' is", param="bias")
    for name, what in _REFUSED.items():
        if data.get(name):
            raise AdapterError(f"{source}: {name} ({what}) is not served; set {name} off to serve "
                               "this adapter", param=name)
    for t in _target_names(data.get("target_modules")):
        last = t.rsplit(".", 1)[-1]
        if last in EMBEDDING_MODULES or any(e in t for e in EMBEDDING_MODULES):
            raise AdapterError(f"{source}: target_modules names {t!r}: embedding and lm_head LoRA "
                               f"are not served; targets may be {', '.join(SUPPORTED_MODULES)}",
                               param="target_modules")
    try:
        r = int(data["r"])
        alpha = float(data.get("lora_alpha", 8))
        ranks = {str(k): int(v) for k, v in (data.get("rank_pattern") or {}).items()}
        alphas = {str(k): float(v) for k, v in (data.get("alpha_pattern") or {}).items()}
    except KeyError:
        raise AdapterError(f"{source}: no rank 'r'", param="r") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"{source}: invalid r, lora_alpha, rank_pattern or alpha_pattern: {e}",
                           param="r") from None
    if r <= 0 or any(v <= 0 for v in ranks.values()):
        raise AdapterError(f"{source}: ranks must be positive (r {r}, rank_pattern {ranks})",
                           param="r")
    return AdapterConfig(r=r, lora_alpha=alpha, use_rslora=bool(data.get("use_rslora", False)),
                         rank_pattern=ranks, alpha_pattern=alphas)


def read_adapter_config(path: str | Path) -> AdapterConfig:
    cfg_file, _ = adapter_files(path)
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # nested past the stack
        raise AdapterError(f"{cfg_file}: invalid JSON: {type(e).__name__}: {e}"[:400],
                           param="lora_path") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object", param="lora_path")
    return parse_adapter_config(data, str(cfg_file))
