"""An adapter's tensors against the base model: which projections, ranks, shapes.

Read from the safetensors header alone (no tensor is loaded), so the
ingress can check an adapter when it is registered and refuse a bad one
with a 400 before any replica sees it. PEFT writes each projection's pair as

    base_model.model.model.layers.<i>.self_attn.<q|k|v|o>_proj.lora_A.weight  [r, in]
    base_model.model.model.layers.<i>.mlp.<gate|up|down>_proj.lora_B.weight   [out, r]

Every tensor must be such a pair's half on a projection the model has: the
attention projections of every attention layer (the output one by the
family's own name where it has one, Phi's and GPT-NeoX's ``dense``), the MLP
projections of dense layers (an MoE layer's experts and router take no
LoRA), an ungated MLP's up and down by their names in
``FamilyOptions.plain_mlp`` (StarCoder2's ``c_fc`` / ``c_proj``, Phi's
``fc1`` / ``fc2``, GPT-NeoX's ``dense_h_to_4h`` / ``dense_4h_to_h`` under
``gpt_neox.layers.<i>``, whose fused ``query_key_value`` lands on q/k/v;
Nemotron's, Arcee's, Jais 2's, Apertus' ``up_proj`` / ``down_proj``), the
fused projections of Phi-3 (``qkv_proj``: [q | k | v] rows; ``gate_up_proj``)
and GLM / GLM-4 (``gate_up_proj``), each served as parts sharing its A, and,
in a hybrid model's Gated DeltaNet layers, the ``linear_attn`` projections
(Qwen3-Next's ``in_proj_qkvz``, ``in_proj_ba``; Qwen3.5's ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``,
``in_proj_a``; their ``out_proj``; OLMo Hybrid's ``q_proj`` ... ``o_proj``)
and, in the Mamba-2 hybrids (Bamba, Granite 4.0-H, Falcon-H1, Nemotron-H,
Zamba2), the Mamba-2 mixers' ``in_proj`` and ``out_proj`` and their own
names for attention and MLPs (``splitserve.engine.lora.hybrid_layout``),
and, by transformers' ``transformer.h.<i>`` paths (MPT's
``transformer.blocks.<i>``), the projections of GPT-2, GPT-BigCode, Falcon,
Bloom, MPT, GPT-J and CodeGen, fused q/k/v split as their loaders split the
weights (``splitserve.engine.lora.mapped_layout``).
Anything else is refused by name: embedding and lm_head LoRA, DoRA
magnitudes, biases, MoE experts, projections a layer lacks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from splitserve.engine.config import ModelConfig
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.lora.hybrid_layout import MAMBA2_LORA, engine_parts, mamba2_target, zamba2_block_shape
from splitserve.engine.lora.mapped_layout import FUSED_QKV_NAMES, MAPPED_LORA, mapped_parts, mapped_target
from splitserve.engine.lora.adapter import (SUPPORTED_MODULES, AdapterConfig, AdapterError,
                                            adapter_files, read_adapter_config)

# (the module's path, its root, layer, place (dotted where nested), projection, A or B)
_NAME = re.compile(r"^(?:base_model\.model\.)?((model|backbone|gpt_neox)\.layers\.(\d+)\."
                   r"(?:([\w.]+?)\.)?(\w+))\.lora_(A|B)\.weight$")
# the same groups under GPT-2's names (root: transformer.h, MPT's transformer.blocks)
_MAPPED_NAME = re.compile(r"^(?:base_model\.model\.)?((transformer\.(?:h|blocks))\.(\d+)\."
                          r"(?:([\w.]+?)\.)?(\w+))\.lora_(A|B)\.weight$")
_PLACE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# the linear_attn projections of every Gated DeltaNet variant (``_delta_net_shapes``)
_LINEAR_ATTN = ("in_proj_qkvz", "in_proj_ba", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                "out_proj", "q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj", "o_proj")
# families whose q_proj gives each head's query and output gate (Qwen3-Next's gated attention)
QUERY_GATED = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
# families whose checkpoints (and so PEFT's modules) fuse q/k/v as qkv_proj ([q | k | v] rows)
# or gate/up as gate_up_proj ([gate | up] rows): one LoRA served as parts sharing A
FUSED_QKV = ("phi3",)
FUSED_GATE_UP = ("phi3", "glm", "glm4")
GATED_DELTA_NET = "gated_delta_net"  # the hybrid layer kind whose linear_attn takes LoRA


@dataclass(frozen=True)
class ModuleLora:
    """One projection's LoRA: A [rank, in], B [out, rank], y += scaling * x A^T B^T."""

    rank: int
    scaling: float
    a_name: str  # its tensors' names in the file
    b_name: str
    b_rows: tuple[int, int] = (0, 0)  # (first, count) of lora_B's rows this target takes; count 0: all
    b_period: int = 0  # b_rows within each run of this many rows (per head); 0: within the whole


@dataclass(frozen=True)
class AdapterLayout:
    """(layer, projection name) -> its LoRA, for every projection the adapter targets."""

    modules: dict[tuple[int, str], ModuleLora]

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


def projection_shape(cfg: ModelConfig, layer: int, place: str, module: str) -> tuple[int, int] | None:
    """(in, out) features of ``place.module`` (``self_attn.q_proj``) in
    ``layer``; None where the model has no such dense projection (an MoE
    layer's MLP, or a hybrid layer of the other kind: see ``layer_lacks``)."""
    if place == "zamba2_block":
        return zamba2_block_shape(cfg, module)
    if place == "plain_mlp":  # the ungated MLP (FamilyOptions.plain_mlp: up, down), Nemotron-H's MLP blocks
        (up, down), h, i = cfg.options.plain_mlp, cfg.hidden_size, cfg.intermediate_size
        return {up: (h, i), down: (i, h)}[module]
    if place == "shared_mlp":  # Granite 4.0-H's fused dense MLP, in every layer
        h, i = cfg.hidden_size, cfg.intermediate_size
        return {"input_linear": (h, 2 * i), "output_linear": (i, h)}[module]
    if place == "mamba":
        if layer_lacks(cfg, layer, place, module):
            return None
        s, h = cfg.options.mamba2, cfg.hidden_size
        return {"in_proj": (h, s.inner + s.conv_dim + s.num_heads), "out_proj": (s.inner, h)}[module]
    if place == "mlp":
        if cfg.moe is not None and cfg.moe.sparse_layers[layer]:
            return None
        h, i = cfg.hidden_size, cfg.intermediate_size
        return {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
                "gate_up_proj": (h, 2 * i)}[module]
    if layer_lacks(cfg, layer, place, module):
        return None
    if place == "linear_attn":
        return _delta_net_shapes(cfg).get(module)
    q, kv, h = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
    q_rows = 2 * q if cfg.family in QUERY_GATED else q
    if module in FUSED_QKV_NAMES:  # GPT-NeoX's, Phi-3's and MAPPED_LORA's fused projections
        return h, q + 2 * kv
    return {"q_proj": (h, q_rows), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}[module]


def _delta_net_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """A Gated DeltaNet layer's projections, name -> (in, out)."""
    s, h = cfg.options.gated_delta_net, cfg.hidden_size
    out = "out_proj"
    if cfg.family == "olmo_hybrid":
        inputs = {"q_proj": s.key_dim, "k_proj": s.key_dim, "v_proj": s.value_dim, "g_proj": s.value_dim,
                  "b_proj": s.num_v_heads, "a_proj": s.num_v_heads}
        out = "o_proj"
    elif s.fused_projections:  # Qwen3-Next
        inputs = {"in_proj_qkvz": 2 * s.key_dim + 2 * s.value_dim, "in_proj_ba": 2 * s.num_v_heads}
    else:  # Qwen3.5
        inputs = {"in_proj_qkv": s.conv_dim, "in_proj_z": s.value_dim, "in_proj_b": s.num_v_heads,
                  "in_proj_a": s.num_v_heads}
    return {**{n: (h, o) for n, o in inputs.items()}, out: (s.value_dim, h)}


def layer_lacks(cfg: ModelConfig, layer: int, place: str, module: str) -> str:
    """Why ``layer`` has no attention (``self_attn``), Gated DeltaNet
    (``linear_attn``) or Mamba-2 (``mamba``) projection ``module``; "" where it has one."""
    hybrid = cfg.options.hybrid
    kind = ATTENTION if hybrid is None else hybrid.layer_kinds[layer]
    if place == "self_attn" and hybrid is not None and layer not in hybrid.attention_layers:
        return f"layer {layer} is a {kind} layer, without self_attn"
    if place == "mamba" and (cfg.family not in MAMBA2_LORA or layer not in hybrid.state_layers):
        return f"layer {layer} is {'an' if kind == ATTENTION else 'a'} {kind} layer, without a " \
               "Mamba-2 mixer that takes LoRA"
    if place == "linear_attn" and kind != GATED_DELTA_NET:
        return f"layer {layer} is {'an' if kind == ATTENTION else 'a'} {kind} layer, without linear_attn"
    if place == "linear_attn" and module not in _delta_net_shapes(cfg):
        return f"this model's linear_attn has no {module} (its projections: " \
               f"{', '.join(_delta_net_shapes(cfg))})"
    return ""


def _refusal(name: str) -> str:
    """Why a tensor name fits no served projection."""
    if "lora_embedding" in name or "embed_tokens" in name or "lm_head" in name:
        return "embedding and lm_head LoRA are not served"
    if "lora_magnitude_vector" in name:
        return "DoRA (use_dora) is not served"
    if name.endswith(".bias"):
        return "LoRA biases are not served"
    if any(k in name for k in ("experts", "block_sparse_moe", ".gate.", "shared_expert")):
        return "MoE experts, routers and shared experts take no LoRA (attention and dense MLP do)"
    return (f"it is no lora_A/lora_B weight of {', '.join(SUPPORTED_MODULES)} in "
            "model.layers.<i> (nor of an ungated MLP's up/down by its own names, nor of a Gated "
            "DeltaNet layer's linear_attn projections, nor of a Mamba-2 hybrid's mamba "
            "in_proj/out_proj)")


def _target(model: ModelConfig, m: re.Match) -> tuple[int, str, str] | str | None:
    """(engine layer, place, projection) of the tensor ``m`` names, where LoRA
    is served on it: attention and MLP projections (an ungated MLP's by its
    own names, place ``plain_mlp``), a Gated DeltaNet layer's ``linear_attn``
    ones, the Mamba-2 hybrids' (``hybrid_layout``); a str: why it is refused;
    None: no served name."""
    root, layer, place, module = m.group(2), int(m.group(3)), m.group(4) or "", m.group(5)
    if root.startswith("transformer.") or model.family in MAPPED_LORA:  # GPT-2's names
        return mapped_target(model, root, layer, place, module)
    if model.family in MAMBA2_LORA:
        target = mamba2_target(model, root, layer, place, module)
        return target + (module,) if isinstance(target, tuple) else target
    if root == "gpt_neox" and model.family == "gpt_neox":
        place = {"attention": "self_attn"}.get(place, place)
    elif root != "model":
        return None
    if place == "linear_attn":
        return (layer, place, module) if module in _LINEAR_ATTN else None
    if place == "self_attn":
        return _attention_target(model, layer, module)
    if place == "mlp" and model.options.plain_mlp:
        return _plain_mlp_target(model, layer, module)
    if place == "mlp" and module == "gate_up_proj" and model.family in FUSED_GATE_UP:
        return layer, place, module
    return (layer, place, module) if _PLACE.get(module) == place else None


def _attention_target(model: ModelConfig, layer: int, module: str) -> tuple[int, str, str] | str | None:
    """An attention projection's target; the output projection by the model's
    own name for it (Phi's and GPT-NeoX's ``dense``) lands on ``o_proj``."""
    out = model.options.o_proj_name
    if model.family == "gpt_neox":
        out = "dense"
        if module == "query_key_value":  # split by head into q/k/v (_parts)
            return layer, "self_attn", module
    if module == out:
        return layer, "self_attn", "o_proj"
    if module == "qkv_proj" and model.family in FUSED_QKV:  # [q | k | v] rows (_parts)
        return layer, "self_attn", module
    if module == "o_proj" or _PLACE.get(module) != "self_attn":
        return None
    return layer, "self_attn", module


def _parts(model: ModelConfig, place: str, module: str) -> tuple[tuple[str, int, int, int], ...]:
    """The engine targets of one PEFT projection: (name, first row, rows, period)
    of its lora_B (``ModuleLora``). GPT-NeoX's fused ``query_key_value`` holds
    each head's q, k and v rows together: its q, k and v parts take ``head_dim``
    rows of every ``3 * head_dim``, as its weight is split at load; the
    ``MAPPED_LORA`` families' as ``mapped_parts`` says."""
    if model.family in MAPPED_LORA:
        return mapped_parts(model, module)
    if place == "self_attn" and module == "query_key_value":
        d = model.head_dim
        return tuple((name, i * d, d, 3 * d) for i, name in enumerate(("q_proj", "k_proj", "v_proj")))
    if place == "self_attn" and module == "qkv_proj":  # Phi-3's [q | k | v], as its weight splits
        q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
        return ("q_proj", 0, q, 0), ("k_proj", q, kv, 0), ("v_proj", q + kv, kv, 0)
    if place == "mlp" and module == "gate_up_proj":  # [gate | up]
        i = model.intermediate_size
        return ("gate_proj", 0, i, 0), ("up_proj", i, i, 0)
    return tuple((name, first, rows, 0) for name, first, rows in engine_parts(model, place, module))


def _plain_mlp_target(model: ModelConfig, layer: int, module: str) -> tuple[int, str, str] | str | None:
    """A projection of the ungated MLP (``FamilyOptions.plain_mlp``), by its own name."""
    if module in model.options.plain_mlp:
        return layer, "plain_mlp", module
    if _PLACE.get(module) == "mlp":
        return (f"{model.architecture}'s MLP is ungated ({' / '.join(model.options.plain_mlp)}): it "
                f"has no {module}; LoRA on those two projections is served")
    return None


def adapter_layout(cfg: AdapterConfig, shapes: dict[str, tuple[int, ...]], model: ModelConfig,
                   max_rank: int, source: str = "adapter_model.safetensors") -> AdapterLayout:
    """Check tensor ``shapes`` (name -> shape) against ``model``; return the layout."""
    halves: dict[tuple[int, str, str, str], dict[str, tuple[str, tuple[int, ...]]]] = {}
    for name, shape in shapes.items():
        m = _NAME.match(name) or _MAPPED_NAME.match(name)
        target = None if m is None else _target(model, m)
        if not isinstance(target, tuple):
            raise AdapterError(f"{source}: tensor {name!r}: {target or _refusal(name)}",
                               param="target_modules")
        (layer, place, module), path = target, m.group(1)
        if layer >= model.num_layers:
            raise AdapterError(f"{source}: tensor {name!r} is for layer {layer}; the model has "
                               f"{model.num_layers} layers", param="target_modules")
        if lacks := layer_lacks(model, layer, place, module):
            raise AdapterError(f"{source}: tensor {name!r}: {lacks}; LoRA on a projection the "
                               "model lacks is refused", param="target_modules")
        if projection_shape(model, layer, place, module) is None:
            raise AdapterError(f"{source}: tensor {name!r}: layer {layer} is a mixture-of-experts "
                               "layer; MoE experts and routers take no LoRA", param="target_modules")
        halves.setdefault((layer, place, module, path), {})[m.group(6)] = (name, tuple(shape))
    modules: dict[tuple[int, str], ModuleLora] = {}
    for (layer, place, module, key), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"{source}: {key} has no {missing} weight", param="target_modules")
        (a_name, a_shape), (b_name, b_shape) = pair["A"], pair["B"]
        d_in, d_out = projection_shape(model, layer, place, module)
        r = cfg.rank_of(key)
        if a_shape != (r, d_in) or b_shape != (d_out, r):
            raise AdapterError(
                f"{source}: {key}: lora_A {list(a_shape)} and lora_B {list(b_shape)} do not fit "
                f"rank {r} (adapter_config.json) on this model's [{d_out}, {d_in}] projection; "
                "was the adapter trained for another base model?", param="r")
        if r > max_rank:
            raise AdapterError(f"{source}: {key} has rank {r}, above this model's max_lora_rank "
                               f"({max_rank})", param="r")
        for part, first, rows, period in _parts(model, place, module):
            modules[(layer, part)] = ModuleLora(r, cfg.scaling_of(key), a_name, b_name, (first, rows), period)
    if not modules:
        raise AdapterError(f"{source}: no LoRA weights", param="target_modules")
    return AdapterLayout(modules)


def read_layout(path: str | Path, model: ModelConfig, max_rank: int) -> AdapterLayout:
    """Check the PEFT folder ``path`` against ``model`` (config and header only)."""
    cfg = read_adapter_config(path)
    _, weights = adapter_files(path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: not a readable safetensors file: {e}",
                           param="lora_path") from None
    return adapter_layout(cfg, shapes, model, max_rank, str(weights))
