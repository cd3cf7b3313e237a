"""Model shapes: what the step-time and memory arithmetic needs of a model.

A ``ModelShape`` comes from a checkpoint's config.json (through the
engine's own parser) or from a named preset of a public architecture, so a
cluster of models that are not on this machine can still be planned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path


class ShapeError(ValueError):
    """A model shape that cannot be used; the message names the source."""


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int = 0  # 0: dense MLP
    experts_per_token: int = 0
    tie_word_embeddings: bool = False
    # layers with a KV cache where fewer than num_layers (a hybrid model's attention
    # layers, Gemma 4's non-sharing ones); 0: every layer
    num_cache_layers: int = 0

    # -- parameter counts ---------------------------------------------------
    def _attn_params(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        return q + kv + o

    def _mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # gate, up, down

    @property
    def num_params(self) -> int:
        """Every weight, embeddings included (what is stored and loaded)."""
        experts = max(self.num_experts, 1)
        router = self.hidden_size * self.num_experts
        layer = self._attn_params() + experts * self._mlp_params() + router
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb

    @property
    def active_params_per_token(self) -> int:
        """Weights one token multiplies with (no input embedding: a lookup)."""
        experts = self.experts_per_token if self.num_experts else 1
        layer = self._attn_params() + experts * self._mlp_params()
        return self.num_layers * layer + self.vocab_size * self.hidden_size

    def weight_bytes(self, dtype: str) -> float:
        return self.num_params * DTYPE_BYTES.get(dtype, 2)

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """K and V of every layer for one token (Llama-3-8B bf16: 128 KiB)."""
        layers = self.num_cache_layers or self.num_layers
        return 2 * layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES.get(kv_dtype, 2)

    @property
    def key(self) -> str:
        """Stable id of the shape (the database keys models by it)."""
        fields = asdict(self)
        fields.pop("name")
        if not fields["num_cache_layers"]:  # the keys of shapes from before the field
            fields.pop("num_cache_layers")
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.name}@{digest}"

    def to_dict(self) -> dict:
        return asdict(self)


def _preset(name, layers, hidden, inter, heads, kv_heads, vocab, experts=0, per_token=0):
    return ModelShape(name, layers, hidden, inter, heads, kv_heads, hidden // heads, vocab,
                      experts, per_token)


PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    _preset("llama-3.1-8b", 32, 4096, 14336, 32, 8, 128256),
    _preset("llama-3.1-70b", 80, 8192, 28672, 64, 8, 128256),
    _preset("llama-3.2-1b", 16, 2048, 8192, 32, 8, 128256),
    _preset("qwen2.5-7b", 28, 3584, 18944, 28, 4, 152064),
    _preset("mixtral-8x7b", 32, 4096, 14336, 32, 8, 32000, experts=8, per_token=2),
)}


def shape_from_config_json(path: str | Path, name: str | None = None) -> ModelShape:
    """The shape of a Hugging Face checkpoint folder (or its config.json),
    read with the engine's own config parser."""
    from splitserve.engine.config import ModelConfig
    from splitserve.engine.errors import CheckpointError

    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    try:
        raw = json.loads(cfg_path.read_text())
        mc = ModelConfig.from_hf(raw, str(cfg_path))
    except (OSError, json.JSONDecodeError, CheckpointError) as e:
        raise ShapeError(f"{cfg_path}: cannot read the model shape: {e}") from None
    return ModelShape(
        name=name or (p.name if p.is_dir() else p.parent.name), num_layers=mc.num_layers,
        hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
        vocab_size=mc.vocab_size, num_experts=int(raw.get("num_local_experts", 0) or 0),
        experts_per_token=int(raw.get("num_experts_per_tok", 0) or 0),
        tie_word_embeddings=mc.tie_word_embeddings,
        num_cache_layers=mc.num_cache_layers if mc.num_cache_layers != mc.num_layers else 0)


def resolve_shape(spec: str) -> ModelShape:
    """A preset name, or a checkpoint folder / config.json path."""
    if spec in PRESETS:
        return PRESETS[spec]
    if Path(spec).exists():
        return shape_from_config_json(spec)
    raise ShapeError(f"unknown model shape {spec!r}: give a checkpoint folder, a config.json, "
                     f"or one of the presets {sorted(PRESETS)}")
