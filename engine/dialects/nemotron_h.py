"""Nemotron-H (``NemotronHForCausalLM``, transformers' ``nemotron_h``): its
config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' NemotronHConfig and its model read it:

- ``layers_block_type`` (``layer_types``; older configs: the
  ``hybrid_override_pattern`` string, M = Mamba-2, * = attention, - = MLP,
  E = MoE): one block per checkpoint layer, each ``x + mixer(norm(x))``.
  Here a Mamba-2 or attention block and the MLP block right after it make
  one decoder layer (``FamilyOptions.checkpoint_blocks``), with the MLP
  block's norm as its post-attention norm; a mixer followed by another
  mixer makes a layer without an MLP;
- Mamba-2: ``mamba_num_heads`` (128) heads of ``mamba_head_dim`` (64),
  ``n_groups`` (8) groups of B and C of ``ssm_state_size`` (128), a
  convolution of ``conv_kernel`` (4) taps with a bias by ``use_conv_bias``,
  in/out projection biases by ``use_bias``, ``time_step_limit``, SiLU
  (``mamba_hidden_act``); the older ``mamba_*`` names are read too;
- attention: no positional encoding, no biases, ``head_dim`` (128);
- MLP: ``up_proj`` -> ``mlp_hidden_act`` (relu2) -> ``down_proj``, biases
  by ``mlp_bias``;
- MoE blocks (Nemotron 3): DeepSeek-V3's router over ``n_routed_experts``
  (8) ungated experts of ``moe_intermediate_size`` (top
  ``num_experts_per_tok``, 2; ``n_group`` / ``topk_group`` groups;
  ``norm_topk_prob``; ``routed_scaling_factor``), in ``moe_latent_size``
  when set, beside a shared MLP of ``moe_shared_expert_intermediate_size``
  (``splitserve.engine.models.nemotron_h_moe``);
- RMSNorms of ``layer_norm_epsilon`` (1e-5) multiplying their weight in
  float32; the embeddings never tied to the LM head; ``mtp.*`` tensors
  (multi-token prediction) skipped at load.

Refused: an MLP or MoE block that does not follow a Mamba-2 or attention
block, a model without attention blocks,
Mamba activations other than SiLU, fp8 checkpoints (tensors renamed at
load), tensor parallelism (the Mamba-2 layers are not sharded). LoRA
adapters apply to the attention blocks' projections and the Mamba-2 blocks'
``in_proj`` (PEFT adapts no ``out_proj`` here) and the MLP blocks'
``up_proj`` / ``down_proj``, named by checkpoint block
(``model.layers.<j>.mixer`` or ``backbone.layers.<j>.mixer``); MoE blocks
take none. A hybrid model's engine caches prefixes
with state checkpoints.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint
from splitserve.engine.dialects.mamba2_keys import checked_kinds, hybrid_layout, json_float
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.mamba2_config import Mamba2Shape

ARCH = "NemotronHForCausalLM"
# keys read as Llama's, with transformers' NemotronHConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 21504, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 4096, "mlp_bias": False,
           "torch_dtype": None, "dtype": None, "quantization_config": None, "bos_token_id": 1,
           "eos_token_id": 2}
# the Mamba-2 keys and their defaults; each with the older name NemotronHConfig also reads
_MAMBA = {"mamba_num_heads": (128, None), "mamba_head_dim": (64, None), "n_groups": (8, "mamba_n_groups"),
          "ssm_state_size": (128, None), "conv_kernel": (4, "mamba_d_conv"),
          "use_conv_bias": (True, "mamba_conv_bias"), "use_bias": (False, None),
          "time_step_limit": ((0.0, float("inf")), "mamba_dt_limit")}
PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_MIXERS, _MLPS = ("linear_attention", "full_attention"), ("mlp", "moe")
# the MoE blocks' keys (NemotronHConfig's defaults)
_MOE_DEFAULTS = {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 7688,
                 "moe_shared_expert_intermediate_size": 7688, "norm_topk_prob": True, "n_group": 1,
                 "topk_group": 1, "routed_scaling_factor": 1.0}
_LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}


def block_types(cfg: dict[str, Any]) -> list[str]:
    """Each checkpoint layer's block type, as NemotronHConfig finds them (the
    default: one block of each kind)."""
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    if types is None and cfg.get("hybrid_override_pattern") is not None:
        pattern = str(cfg["hybrid_override_pattern"])
        unknown = sorted(set(pattern) - set(PATTERN))
        if unknown:
            raise ValueError(f"hybrid_override_pattern has unknown block symbols {unknown}; known: "
                             f"{', '.join(PATTERN)}")
        types = [PATTERN[c] for c in pattern]
    types = [_LEGACY.get(t, t) for t in types or ["linear_attention", "moe", "full_attention", "mlp"]]
    unknown = sorted({str(t) for t in types if t not in (*_MIXERS, *_MLPS)})
    if unknown:
        raise ValueError(f"layers_block_type {unknown} are not supported; supported: "
                         f"{', '.join(_MIXERS + _MLPS)}")
    return types


def groups(types: list[str]) -> tuple[tuple[int, int], ...]:
    """(mixer block, MLP block after it or -1) per decoder layer."""
    out: list[tuple[int, int]] = []
    for j, t in enumerate(types):
        if t in _MIXERS:
            out.append((j, -1))
        elif not out or out[-1][1] != -1 or out[-1][0] != j - 1:
            raise ValueError(f"layers_block_type: block {j} ({t}) does not follow a Mamba-2 or attention "
                             "block; such a pattern is not supported")
        else:
            out[-1] = (j - 1, j)
    return tuple(out)


def mamba2_shape(cfg: dict[str, Any]) -> Mamba2Shape:
    m = {}
    for key, (default, old) in _MAMBA.items():
        value = cfg.get(old) if old is not None and cfg.get(old) is not None else cfg.get(key)
        m[key] = default if value is None else value
    act = cfg.get("mamba_hidden_act") or "silu"
    if act not in ("silu", "swish"):
        raise ValueError(f"mamba_hidden_act {act!r} is not supported for {ARCH}; supported: silu")
    limit = tuple(json_float(v) for v in m["time_step_limit"])
    if len(limit) != 2:
        raise ValueError(f"time_step_limit must be (low, high), got {m['time_step_limit']!r}")
    return Mamba2Shape(num_heads=int(m["mamba_num_heads"]), head_dim=int(m["mamba_head_dim"]),
                       n_groups=int(m["n_groups"]), state_size=int(m["ssm_state_size"]),
                       conv_kernel=int(m["conv_kernel"]), conv_bias=bool(m["use_conv_bias"]),
                       proj_bias=bool(m["use_bias"]), time_step_limit=limit)


def moe_keys(cfg: dict[str, Any], types: list[str], blocks: tuple[tuple[int, int], ...]) -> dict[str, Any]:
    """The sparse MLP blocks' shape and DeepSeek-V3's router, in Llama's (Qwen's) MoE keys;
    the decoder layers whose MLP block is not one are ``mlp_only_layers``."""
    m = {**_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if k in _MOE_DEFAULTS and v is not None}}
    experts, groups_ = int(m["n_routed_experts"]), int(m["n_group"])
    if experts % groups_:
        raise ValueError(f"n_group {groups_} must divide n_routed_experts {experts}")
    return {"num_experts": experts, "num_experts_per_tok": int(m["num_experts_per_tok"]),
            "moe_intermediate_size": int(m["moe_intermediate_size"]), "norm_topk_prob": bool(m["norm_topk_prob"]),
            "shared_expert_intermediate_size": int(m["moe_shared_expert_intermediate_size"]),
            "mlp_only_layers": [i for i, (_, mlp) in enumerate(blocks) if mlp < 0 or types[mlp] != "moe"],
            "moe_routing": {"grouped_sigmoid": True, "num_groups": groups_, "topk_groups": int(m["topk_group"]),
                            "routed_scaling_factor": float(m["routed_scaling_factor"])}}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    types = block_types(cfg)
    blocks = groups(types)
    out = passed_keys(cfg, _PASSED)
    out.update(num_hidden_layers=len(blocks),
               rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), tie_word_embeddings=False,
               attention_bias=False, attention_out_bias=False, qk_norm=False)
    if "moe" in types:
        out.update(moe_keys(cfg, types, blocks))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its tensors are renamed at load")
    types = block_types(cfg)
    blocks = groups(types)
    kinds = checked_kinds([types[m] for m, _ in blocks], len(blocks), "layers_block_type")
    shape = mamba2_shape(cfg)
    latent = int(cfg.get("moe_latent_size") or 0)
    if latent < 0:
        raise ValueError(f"moe_latent_size must be positive or null, got {latent}")
    return FamilyOptions(
        hidden_act=plain_activation(cfg, ARCH, "relu2", key="mlp_hidden_act"),
        plain_mlp=("up_proj", "down_proj"),
        norm_fp32_product=True, final_norm_name="backbone.norm_f",
        nope_layers=tuple(i for i, k in enumerate(kinds) if k == ATTENTION),
        hybrid=hybrid_layout(kinds, shape), mamba2=shape, checkpoint_blocks=blocks, moe_latent_size=latent,
        tensor_parallel_refusal="nemotron_h's recurrent (Mamba-2) layers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
