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


# fields a shape's key leaves out: counted from the checkpoint the other fields
# describe, so the rows measured before they were counted keep matching
KEYLESS = ("params_total", "params_active", "max_position", "state_heads", "params_routed")
# fields added after the first keys were made: in the key only when set
ADDED_FIELDS = ("num_cache_layers", "state_elems", "state_elems_fp32", "kv_planes", "fp8_weights")


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
    # layers, Gemma 4's non-sharing ones); 0: every layer (none when the shape keeps
    # recurrent state: a model without attention layers)
    num_cache_layers: int = 0
    # exact counts of the engine's own model (cluster.planning.param_count); 0: unknown,
    # the per-layer formulas below stand in (named presets without a count)
    params_total: int = 0
    params_active: int = 0  # per token: the chosen experts only, no lookup tables
    # a hybrid model's recurrent state per sequence over its recurrent layers: elements
    # kept in the model's compute dtype and in float32 (engine.hybrid_config.StateKind)
    state_elems: int = 0
    state_elems_fp32: int = 0
    max_position: int = 0  # the model's context length; 0: unknown
    # K and V planes a cached layer stores per token (ModelConfig.kv_planes): 1 where one
    # vector is both key and value (multi-head latent attention's latent); 0: 2
    kv_planes: int = 0
    # the heads a hybrid's recurrent layers split by across tensor-parallel ranks, each rank
    # keeping 1/N of the states (Qwen3-Next's and Qwen3.5's linear_num_key_heads); 0: its
    # recurrent layers are not split (tensor parallelism refused). Not in the profile database
    state_heads: int = 0
    # the routed experts' weights, all of them (param_count's ``routed``); 0: uncounted (see
    # ``routed_params``). A decode step of few tokens reads only the experts they choose
    params_routed: int = 0
    # the checkpoint stores its projections in fp8 (HF fp8 or compressed-tensors float8): it
    # is served in fp8 whatever weight_dtype says, at one byte per projection weight
    fp8_weights: bool = False

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
        """Every weight, embeddings included (what is stored and loaded): the
        exact count where known, else attention + a 3-matrix MLP (times the
        experts) per layer."""
        if self.params_total:
            return self.params_total
        experts = max(self.num_experts, 1)
        router = self.hidden_size * self.num_experts
        layer = self._attn_params() + experts * self._mlp_params() + router
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb

    @property
    def active_params_per_token(self) -> int:
        """Weights one token multiplies with (no input embedding: a lookup)."""
        if self.params_active:
            return self.params_active
        experts = self.experts_per_token if self.num_experts else 1
        layer = self._attn_params() + experts * self._mlp_params()
        return self.num_layers * layer + self.vocab_size * self.hidden_size

    def weight_bytes(self, dtype: str) -> float:
        return self.num_params * DTYPE_BYTES.get(dtype, 2)

    @property
    def routed_params(self) -> int:
        """The routed experts' weights (every expert of every MoE layer): the
        exact count where known; the per-layer formula's for a shape without
        counts (a named preset); 0 for a dense model, and for a shape counted
        before routed experts were (its steps then read every weight)."""
        if not self.num_experts:
            return 0
        if self.params_routed or self.params_total:
            return self.params_routed
        return self.num_layers * self.num_experts * self._mlp_params()

    @property
    def expert_pass_probability(self) -> float:
        """The chance that one token's router passes over a given expert
        (1 - experts_per_token / num_experts): a step of T tokens routed
        uniformly leaves that share to the power T of the experts unread."""
        return 1.0 - self.experts_per_token / self.num_experts if self.num_experts else 1.0

    @property
    def keeps_state(self) -> bool:
        """Whether the model keeps a recurrent state per sequence (a hybrid)."""
        return bool(self.state_elems or self.state_elems_fp32)

    @property
    def cache_layers(self) -> int:
        """Layers that keep K and V in the paged cache."""
        return self.num_cache_layers if self.num_cache_layers or self.keeps_state else self.num_layers

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """K and V of every cached layer for one token (Llama-3-8B bf16: 128
        KiB), as ``engine.config.ModelConfig.kv_bytes_per_token``."""
        planes = self.kv_planes or 2
        return planes * self.cache_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES.get(kv_dtype, 2)

    def state_bytes_per_sequence(self, dtype: str) -> int:
        """One sequence's recurrent states, the model-dtype ones in ``dtype``
        (the engine's compute dtype; fp8 weights compute in bfloat16)."""
        elem = 2 if dtype == "fp8" else DTYPE_BYTES.get(dtype, 2)
        return self.state_elems * elem + 4 * self.state_elems_fp32

    def rank_state_bytes_per_sequence(self, dtype: str, tensor_parallel: int = 1) -> int:
        """One sequence's recurrent states on one of ``tensor_parallel`` ranks:
        1/N of them where the states split by heads (``state_heads``)."""
        whole = self.state_bytes_per_sequence(dtype)
        return whole // tensor_parallel if self.state_heads and tensor_parallel > 1 else whole

    @property
    def key(self) -> str:
        """Stable id of the shape (the database keys models by it)."""
        fields = asdict(self)
        fields.pop("name")
        for derived in KEYLESS:
            fields.pop(derived)
        for added in ADDED_FIELDS:  # the keys of shapes from before the field
            if not fields[added]:
                fields.pop(added)
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.name}@{digest}"

    def to_dict(self) -> dict:
        return asdict(self)


def _preset(name, layers, hidden, inter, heads, kv_heads, vocab, experts=0, per_token=0,
            tied=False):
    return ModelShape(name, layers, hidden, inter, heads, kv_heads, hidden // heads, vocab,
                      experts, per_token, tied)


# Qwen3-Next-80B-A3B (transformers' Qwen3NextConfig defaults, its released shape): 48
# layers, every 4th attending (16 heads of 256, 2 KV heads), the others Gated DeltaNet
# (16 key heads x 128, 32 value heads x 128, 4 conv taps); 512 experts of 512, 10 per
# token, and a shared expert. Counts from param_count on that config (a unit test
# rebuilds them); state per sequence: the conv window (8192 x 3, model dtype) and the
# delta rule's (32 x 128 x 128, float32) on each of 36 layers (74 MiB in bf16).
QWEN3_NEXT_80B = ModelShape(
    "qwen3-next-80b-a3b", num_layers=48, hidden_size=2048, intermediate_size=512, num_heads=16,
    num_kv_heads=2, head_dim=256, vocab_size=151936, num_experts=512, experts_per_token=10,
    num_cache_layers=12, params_total=79_674_391_296, params_active=3_563_764_480,
    state_elems=36 * 8192 * 3, state_elems_fp32=36 * 32 * 128 * 128, max_position=262144,
    state_heads=16, params_routed=77_309_411_328)


PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    _preset("llama-3.1-8b", 32, 4096, 14336, 32, 8, 128256),
    _preset("llama-3.1-70b", 80, 8192, 28672, 64, 8, 128256),
    _preset("llama-3.2-1b", 16, 2048, 8192, 32, 8, 128256, tied=True),
    _preset("qwen2.5-7b", 28, 3584, 18944, 28, 4, 152064),
    _preset("mixtral-8x7b", 32, 4096, 14336, 32, 8, 32000, experts=8, per_token=2),
    QWEN3_NEXT_80B,
)}


def shape_from_config_json(path: str | Path, name: str | None = None) -> ModelShape:
    """The shape of a Hugging Face checkpoint folder (or its config.json),
    read with the engine's own config parser; its parameters counted on the
    engine's own model built on the meta device (``param_count``)."""
    from splitserve.cluster.planning.param_count import count_parameters, state_elements
    from splitserve.engine.checkpoint_files import read_json
    from splitserve.engine.config import ModelConfig
    from splitserve.engine.errors import CheckpointError

    p = Path(path)
    if not p.exists():
        raise ShapeError(f"{p}: no such checkpoint folder")
    cfg_path = p / "config.json" if p.is_dir() else p
    try:  # read_json's errors name the file: a folder, not JSON, not an object
        mc = ModelConfig.from_hf(read_json(cfg_path, "model config"), str(cfg_path))
    except (OSError, CheckpointError) as e:
        raise ShapeError(f"cannot read the model shape: {e}") from None
    try:
        count = count_parameters(mc)
    except (CheckpointError, ValueError) as e:
        raise ShapeError(f"{cfg_path}: cannot read the model shape: {e}") from None
    state, state_fp32 = state_elements(mc)
    return ModelShape(
        name=name or (p.name if p.is_dir() else p.parent.name), num_layers=mc.num_layers,
        hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
        vocab_size=mc.vocab_size, num_experts=count.num_experts,
        experts_per_token=count.experts_per_token,
        tie_word_embeddings=mc.tie_word_embeddings,
        num_cache_layers=mc.num_cache_layers if mc.num_cache_layers != mc.num_layers else 0,
        params_total=count.total, params_active=count.active_per_token,
        state_elems=state, state_elems_fp32=state_fp32, max_position=mc.max_position,
        kv_planes=mc.kv_planes if mc.kv_planes != 2 else 0, state_heads=state_heads(mc),
        params_routed=count.routed, fp8_weights=mc.quantization is not None)


def state_heads(mc) -> int:
    """``ModelShape.state_heads`` of an engine ``ModelConfig``: the Gated
    DeltaNet's key heads where the engine splits them across ranks
    (``engine.parallel.plan``: families without a tensor-parallel refusal)."""
    gdn = mc.options.gated_delta_net
    return gdn.num_k_heads if gdn is not None and not mc.options.tensor_parallel_refusal else 0


def resolve_shape(spec: str) -> ModelShape:
    """A preset name, or a checkpoint folder / config.json path."""
    if spec in PRESETS:
        return PRESETS[spec]
    if Path(spec).exists():
        return shape_from_config_json(spec)
    raise ShapeError(f"unknown model shape {spec!r}: give a checkpoint folder, a config.json, "
                     f"or one of the presets {sorted(PRESETS)}")
