"""What the Gemma, Gemma 2, Gemma 3, Phi-3, Granite, OLMo 2, SmolLM3,
Helium, StarCoder2, Phi, StableLM and GPT-NeoX families add to the Llama-style
decoder, read from their ``config.json``.

``ModelConfig.options`` holds one ``FamilyOptions``; the Llama, Mistral,
Qwen and MoE families keep the defaults, which change nothing. Each field
names the transformers behaviour it reproduces; a checkpoint asking for
something these options cannot express is refused here, before any weight
is read, with a ``ValueError`` that ``ModelConfig.from_hf`` turns into a
``CheckpointError`` naming config.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from splitserve.engine.falcon_h1_config import FalconH1Scales
from splitserve.engine.gemma4_config import Gemma4Shape
from splitserve.engine.hybrid_config import GatedDeltaNetShape, HybridLayout
from splitserve.engine.lfm2_config import Lfm2Shape
from splitserve.engine.mamba2_config import Mamba2Shape
from splitserve.engine.mamba_config import Mamba1Shape
from splitserve.engine.mimo_v2_config import MiMoV2Shape
from splitserve.engine.mla_config import MLAConfig
from splitserve.engine.recurrent_gemma_config import RgLruShape
from splitserve.engine.zamba2_config import Zamba2Blocks

# config.json activation names -> the gated MLP's activation
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}
# ... and those of the plain (fc -> act -> proj) MLP, applied with torch: the
# exact erf GELU, the tanh approximation (transformers' gelu_new is that formula)
PLAIN_ACTIVATIONS = {
    **_ACTIVATIONS,
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",  # Nemotron, Arcee: relu(x) ** 2 (transformers' ReLUSquaredActivation)
}

# The families whose checkpoints need more than the Llama-style defaults.
OPTION_FAMILIES = ("gemma", "gemma2", "gemma3", "phi3", "granite", "olmo2", "smollm3", "helium",
                   "starcoder2", "phi", "stablelm", "gpt_neox")
# The families whose MLP is ungated (up -> act -> down).
_PLAIN_MLP_FAMILIES = ("starcoder2", "phi", "gpt_neox")
# transformers' partial_rotary_factor where config.json names none
_DEFAULT_ROTARY_FACTOR = {"phi": 0.5, "stablelm": 0.25, "gpt_neox": 0.25}

# transformers' RoPE base where config.json names none (its config classes' default_theta)
DEFAULT_ROPE_THETA = {"gemma3": 1_000_000.0, "smollm3": 2_000_000.0, "helium": 100_000.0}
GEMMA3_LOCAL_ROPE_THETA = 10_000.0  # Gemma 3's sliding layers, without rope_local_base_freq


@dataclass(frozen=True)
class FamilyOptions:
    # the MLP's activation: silu | gelu_tanh (gated: SwiGLU, GeGLU); the ungated MLP
    # (plain_mlp) also gelu (erf) | relu | relu2 (squared)
    hidden_act: str = "silu"
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight)
    # Gemma, OLMo 2: RMSNorm multiplies the weight into the float32 normed row and
    # rounds once (Llama rounds the normed row to the model dtype first)
    norm_fp32_product: bool = False
    embed_scale: float = 1.0  # Gemma: sqrt(hidden_size); Granite: embedding_multiplier
    # None: head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar; Granite: attention_multiplier)
    attn_scale: float | None = None
    attn_softcap: float = 0.0  # Gemma 2: cap * tanh(score / cap) on attention scores; 0 = none
    final_softcap: float = 0.0  # Gemma 2: the same on the output logits; 0 = none
    sandwich_norms: bool = False  # Gemma 2: norms after attention and around the MLP
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj stored fused
    rotary_dim: int | None = None  # Phi-3 partial_rotary_factor: dims that rotate; None = all
    original_max_position: int = 0  # Phi-3: LongRoPE's original_max_position_embeddings
    residual_scale: float = 1.0  # Granite residual_multiplier: each block's output scaled before the add
    logits_divisor: float = 1.0  # Granite logits_scaling: the output logits divided by it
    post_norms: bool = False  # OLMo 2: norms on the attention and MLP outputs, none before them
    full_qk_norm: bool = False  # OLMo 2: q/k RMSNorm over every head at once, not per head
    # Gemma 3: the sliding-window layers rotate with their own base (default RoPE, no scaling)
    local_rope_layers: tuple[int, ...] = ()
    local_rope_theta: float = 0.0
    nope_layers: tuple[int, ...] = ()  # SmolLM3 no_rope_layers: the layers that apply no RoPE
    # Helium: RoPE rotates adjacent dim pairs (2i, 2i+1), not (i, i + D/2); q/k rows are
    # reordered at load so the rotate-half kernels compute it (splitserve.engine.models.helium)
    interleaved_rope: bool = False
    layer_norm: bool = False  # StarCoder2, Phi, StableLM: LayerNorm (weight, bias), not RMSNorm
    # StarCoder2, Phi: an ungated MLP, up -> act -> down, by these checkpoint names
    # (``plain_mlp``: (up, down), e.g. ("c_fc", "c_proj")); empty: the gated MLP
    plain_mlp: tuple[str, ...] = ()
    o_proj_name: str = "o_proj"  # the attention output projection's checkpoint name (Phi: dense)
    # Phi, StableLM use_parallel_residual: x + attn(norm(x)) + mlp(norm(x)), one norm;
    # GPT-NeoX (``parallel_mlp_norm``): x + attn(norm1(x)) + mlp(norm2(x))
    parallel_residual: bool = False
    parallel_mlp_norm: bool = False
    final_norm_name: str = "model.norm"  # Phi: model.final_layernorm
    lm_head_bias: bool = False  # Phi: the vocabulary projection has a bias
    # GPT-2 wpe, OPT embed_positions: a learned absolute position table, by this name in
    # weight_slots, whose row ``position + position_offset`` is added to each token's
    # embedding; its layers apply no RoPE. Empty: none (RoPE)
    position_table: str = ""
    position_offset: int = 0  # OPT's OPTLearnedPositionalEmbedding: position 0 is row 2
    # GPT-2 scale_attn_by_inverse_layer_idx: layer i's scores also divided by i + 1
    inverse_layer_attn_scale: bool = False
    # OPT do_layer_norm_before false (OPT-350m): each block's norm after its residual add,
    # x = norm(x + block(x)) (splitserve.engine.models.opt)
    norm_after_block: bool = False
    final_norm: bool = True  # False: no norm after the last layer (OPT-350m, _remove_final_layer_norm)
    # OPT word_embed_proj_dim: token embeddings and LM head this wide, mapped to and from
    # hidden_size by project_in / project_out (no bias); 0: hidden_size
    embed_proj_dim: int = 0
    # OLMo, OLMoE clip_qkv: q, k and v clamped to [-clip_qkv, clip_qkv] after the q/k
    # norms (OLMoE), before RoPE; None: no clamp
    clip_qkv: float | None = None
    # LayerNorm computed in float32, no bias, rounded once to the model dtype:
    # "weight" (DBRX's LayerNorm without bias), "cohere" (a weight, by CohereLayerNorm's
    # own formula) or "none", no parameters (OLMo's OlmoLayerNorm); "": the norm
    # ``layer_norm`` says
    float_layer_norm: str = ""
    logit_scale: float = 1.0  # Cohere logit_scale: the output logits multiplied by it
    # Cohere use_qk_norm: q and k LayerNorm-ed per head before RoPE, each head its own
    # weight ([heads, head_dim]; splitserve.engine.models.cohere)
    head_qk_layer_norm: bool = False
    # GLM-4.5 num_nextn_predict_layers: multi-token-prediction layers stored after the last
    # decoder layer (model.layers.{num_hidden_layers + i}), skipped at load as transformers
    # skips them (splitserve.engine.models.glm4_moe)
    mtp_layers: int = 0
    # HunYuan dense V1: the per-head q/k RMSNorms (query_layernorm / key_layernorm) applied
    # after RoPE, not before it
    qk_norm_after_rope: bool = False
    # why the family cannot be split across tensor-parallel ranks where no other option says
    # it (DBRX: tensors split at load, untested across ranks; splitserve.engine.parallel.plan);
    # "": no such reason
    tensor_parallel_refusal: str = ""
    # gpt-oss self_attn.sinks: a learned logit per query head that joins each softmax's
    # denominator as a key without a value (transformers' eager_attention_forward ``sinks``)
    attention_sinks: bool = False
    # Llama 4 use_qk_norm: on the layers that rotate, q and k divided by their root mean
    # square over each head's dims (no weight) once rotated (Llama4TextL2Norm)
    rope_qk_l2_norm: bool = False
    # Llama 4 attn_temperature_tuning: on its layers without RoPE, each query multiplied by
    # 1 + temperature_scale * log1p(floor((position + 1) / temperature_floor)) (attn_scale,
    # floor_scale); 0: off
    temperature_floor: float = 0.0
    temperature_scale: float = 0.0
    # DeepSeek V2 / V3: multi-head latent attention of this shape in every layer, in the
    # absorbed form over a cache of the latent (splitserve.engine.models.mla); None: the
    # Llama-style attention
    mla: MLAConfig | None = None
    # Bloom, MPT, Falcon alibi: ALiBi in place of RoPE, each head's scores biased by
    # slope * (key position - query position) (splitserve.engine.models.alibi): "bloom"
    # (build_alibi_tensor's slopes, which MPT's build_mpt_alibi_tensor shares), "falcon"
    # (those in bfloat16, divided by sqrt(head_dim) as FalconModel scales them); "": none
    alibi: str = ""
    # Bloom apply_residual_connection_post_layernorm: each block's residual is its normed
    # input, not its input (splitserve.engine.models.bloom)
    residual_after_norm: bool = False
    # GraniteSWA layer_rope_theta: each layer's RoPE base, 0 where the layer applies no RoPE,
    # the model's rope_parameters (scaling included) otherwise (splitserve.engine.models.
    # granite_swa); empty: every layer rotates with ``ModelConfig.rope_theta``
    layer_rope_thetas: tuple[float, ...] = ()
    # Ministral 3 llama_4_scaling_beta: every layer's queries, once rotated, multiplied by
    # 1 + beta * log(1 + floor(position / original_max_position_embeddings)) (the length),
    # rounded to the model dtype first (get_llama_4_attn_scale); 0: off
    query_position_beta: float = 0.0
    query_position_length: int = 0
    # Gemma 4: each layer's head width, KV heads, shared keys/values, MLP width and RoPE, and
    # the per-layer input embeddings (splitserve.engine.models.gemma4); None: not Gemma 4
    gemma4: Gemma4Shape | None = None
    # MiMo-V2-Flash: values narrower than the keys and scaled, twice the KV heads and a sink
    # per query head on the sliding layers (splitserve.engine.models.mimo_v2_flash); None:
    # not MiMo-V2-Flash
    mimo_v2: MiMoV2Shape | None = None
    # XGLM pad_token_id: that row of its fixed sinusoidal position table
    # (XGLMSinusoidalPositionalEmbedding's padding_idx) is zeroed; None: no row is
    position_pad_row: int | None = None
    # LongCat-Flash zero_expert_num: router choices past the real experts that return their
    # input times their weight (LongcatFlashMoE; splitserve.engine.models.longcat_flash)
    zero_experts: int = 0
    # Hybrid models: which layers attend over the paged cache and which keep a recurrent
    # state per sequence instead (splitserve.engine.state_cache); None: every layer attends
    hybrid: HybridLayout | None = None
    # Qwen3-Next, Qwen3.5: the shape of their Gated DeltaNet layers
    # (splitserve.engine.models.gated_delta_net); None: none
    gated_delta_net: GatedDeltaNetShape | None = None
    # LFM2, LFM2-MoE, LFM3: their gated short convolutions' shape and the switches that tell
    # the three apart (splitserve.engine.models.lfm2); None: not the LFM2 family
    lfm2: Lfm2Shape | None = None
    # Granite 4.0-H, Bamba, Nemotron-H: the shape of their Mamba-2 layers (transformers'
    # BambaMixer; splitserve.engine.models.mamba2); None: none
    mamba2: Mamba2Shape | None = None
    # Nemotron-H: one mixer per checkpoint layer (backbone.layers.j); per decoder layer here,
    # the checkpoint layers it holds: (its Mamba-2 or attention block, the MLP block after it
    # or -1 for none) (splitserve.engine.models.nemotron_h); empty: one checkpoint layer each
    checkpoint_blocks: tuple[tuple[int, int], ...] = ()
    # Nemotron 3 moe_latent_size: the experts work in this width, between fc1_latent_proj and
    # fc2_latent_proj (splitserve.engine.models.nemotron_h_moe); 0: hidden_size, no projections
    moe_latent_size: int = 0
    # RecurrentGemma: the shape of its recurrent blocks (transformers' RecurrentGemmaRecurrentBlock;
    # splitserve.engine.models.rg_lru); None: none
    rg_lru: RgLruShape | None = None
    # Mamba, Falcon-Mamba, Jamba: the shape of their Mamba-1 layers (transformers'
    # MambaMixer; splitserve.engine.models.mamba1); None: none
    mamba: Mamba1Shape | None = None
    # Mamba, Falcon-Mamba residual_in_fp32: the residual stream kept in float32 between
    # layers (MambaBlock), each norm reading it rounded to the model dtype
    residual_in_fp32: bool = False
    # MiniMax *_alpha_factor / *_beta_factor: (alpha, beta) of the full-attention, lightning
    # and MLP blocks, each residual its normed input: x = norm(x) * alpha + block * beta
    # (splitserve.engine.models.minimax); empty: not MiniMax
    residual_factors: tuple[tuple[float, float], ...] = ()
    # Falcon-H1: its multipliers (embedding, lm_head, attention/SSM in and out, key, MLP gate
    # and down; transformers' FalconH1Model; splitserve.engine.models.falcon_h1); None: none
    falcon_h1: FalconH1Scales | None = None
    # Zamba2: its shared attention + MLP blocks (num_mem_blocks, adapters, use_mem_rope;
    # splitserve.engine.models.zamba2); None: none
    zamba2: Zamba2Blocks | None = None


def parse_family_options(cfg: dict[str, Any], family: str) -> FamilyOptions:
    """The options of ``family`` from its config.json ``cfg`` (defaults for
    families not in ``OPTION_FAMILIES``)."""
    if family not in OPTION_FAMILIES:
        return FamilyOptions()
    hidden = int(cfg["hidden_size"])
    act = family_activation(cfg, family)
    if family == "gemma":
        _no_bidirectional(cfg)
        return FamilyOptions(hidden_act=act, norm_plus_one=True, norm_fp32_product=True, embed_scale=math.sqrt(hidden))
    if family == "gemma2":
        _no_bidirectional(cfg)
        return FamilyOptions(
            hidden_act=act, norm_plus_one=True, norm_fp32_product=True, embed_scale=math.sqrt(hidden),
            attn_scale=float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,
            # Gemma2Config's defaults where config.json leaves them out (null: no cap)
            attn_softcap=_cap(cfg, "attn_logit_softcapping", 50.0),
            final_softcap=_cap(cfg, "final_logit_softcapping", 30.0),
            sandwich_norms=True,
        )
    if family == "gemma3":
        _no_bidirectional(cfg)
        types = gemma3_layer_types(cfg)
        # attn_logit_softcapping is in Gemma 3's config but transformers'
        # Gemma 3 attention never applies it: neither is it applied here
        return FamilyOptions(
            hidden_act=act, norm_plus_one=True, norm_fp32_product=True, embed_scale=math.sqrt(hidden),
            attn_scale=float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,
            final_softcap=_cap(cfg, "final_logit_softcapping"),
            sandwich_norms=True,
            local_rope_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
            local_rope_theta=_gemma3_local_theta(cfg),
        )
    if family == "smollm3":
        return FamilyOptions(hidden_act=act, nope_layers=tuple(
            i for i, rope in enumerate(smollm3_rope_layers(cfg)) if not rope))
    if family == "granite":
        return FamilyOptions(
            hidden_act=act, embed_scale=_multiplier(cfg, "embedding_multiplier"),
            attn_scale=_multiplier(cfg, "attention_multiplier"),
            residual_scale=_multiplier(cfg, "residual_multiplier"),
            logits_divisor=_multiplier(cfg, "logits_scaling"),
        )
    if family == "helium":
        heads, head_dim = int(cfg["num_attention_heads"]), _head_dim(cfg, 128)
        if heads * head_dim != hidden:  # transformers' Helium o_proj is [hidden, hidden]
            raise ValueError(f"Helium needs num_attention_heads * head_dim ({heads} * {head_dim}) "
                             f"equal to hidden_size ({hidden})")
        # transformers' Helium scales scores by 1 / math.sqrt(head_dim)
        return FamilyOptions(hidden_act=act, norm_fp32_product=True, interleaved_rope=True,
                             attn_scale=1 / math.sqrt(head_dim))
    if family == "starcoder2":
        return FamilyOptions(hidden_act=act, layer_norm=True, plain_mlp=("c_fc", "c_proj"))
    if family == "phi":
        if cfg.get("qk_layernorm"):
            raise ValueError("qk_layernorm (LayerNorm on each query/key head) is not supported "
                             "for phi")
        return FamilyOptions(hidden_act=act, layer_norm=True, plain_mlp=("fc1", "fc2"),
                             o_proj_name="dense", parallel_residual=True,
                             final_norm_name="model.final_layernorm", lm_head_bias=True,
                             rotary_dim=_rotary_dim(cfg, family))
    if family == "stablelm":
        if cfg.get("qk_layernorm"):
            raise ValueError("qk_layernorm (LayerNorm on each query/key head) is not supported "
                             "for stablelm")
        return FamilyOptions(hidden_act=act, layer_norm=True,
                             parallel_residual=bool(cfg.get("use_parallel_residual", False)),
                             rotary_dim=_rotary_dim(cfg, family))
    if family == "gpt_neox":
        # the checkpoint's gpt_neox.* names map onto the shared decoder's
        # (splitserve.engine.models.gpt_neox), the MLP's keep theirs
        parallel = bool(cfg.get("use_parallel_residual", True))
        return FamilyOptions(hidden_act=act, layer_norm=True, plain_mlp=("dense_h_to_4h", "dense_4h_to_h"),
                             parallel_residual=parallel, parallel_mlp_norm=parallel,
                             rotary_dim=_rotary_dim(cfg, family))
    if family == "olmo2":
        return FamilyOptions(hidden_act=act, post_norms=True, full_qk_norm=True,
                             norm_fp32_product=True)
    # phi3
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type")) == "yarn":
        raise ValueError("Phi-3 rope scaling 'yarn' (which transformers reads as 'longrope') is "
                         "not supported; write it as 'longrope'")
    return FamilyOptions(hidden_act=act, fused_projections=True, rotary_dim=_rotary_dim(cfg, family),
                         original_max_position=int(cfg.get("original_max_position_embeddings") or 0))


def family_activation(cfg: dict[str, Any], family: str) -> str:
    # Gemma 2 and 3 name it hidden_activation; the others hidden_act.
    # Gemma's legacy "gelu" means the tanh approximation (transformers rewrites it so).
    name = cfg.get("hidden_activation") if family in ("gemma2", "gemma3") else None
    if family == "gemma3":  # its MLP reads hidden_activation alone (a hidden_act is ignored)
        name = name or "gelu_pytorch_tanh"
    name = name or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if family.startswith("gemma") else "silu")
    if family == "gemma" and name == "gelu":
        name = "gelu_pytorch_tanh"
    if family == "starcoder2":
        name = cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if family == "phi":
        name = cfg.get("hidden_act") or "gelu_new"
    if family == "gpt_neox":
        name = cfg.get("hidden_act") or "gelu"
    table = PLAIN_ACTIVATIONS if family in _PLAIN_MLP_FAMILIES else _ACTIVATIONS
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported for {family}; supported: "
                         f"{', '.join(table)}")
    return table[name]


def gemma3_layer_types(cfg: dict[str, Any]) -> list[str]:
    """Gemma 3's ``layer_types``; older configs give ``sliding_window_pattern``
    (default 6): every layer sliding but each pattern-th, as transformers derives it."""
    num_layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(num_layers)]
    return checked_layer_types(types, num_layers, "gemma3")


def checked_layer_types(types: list[Any], num_layers: int, family: str) -> list[str]:
    """A config's ``layer_types``: one per layer, each sliding or full attention."""
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"layer_types {sorted(unknown)} are not supported for {family}; "
                         "supported: sliding_attention, full_attention")
    return list(types)


def _gemma3_local_theta(cfg: dict[str, Any]) -> float:
    # transformers 5: rope_parameters["sliding_attention"]; older configs: rope_local_base_freq
    params = cfg.get("rope_parameters")
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if local:
        kind = local.get("rope_type") or local.get("type") or "default"
        if kind != "default":
            raise ValueError(f"Gemma 3 rope scaling {kind!r} on the sliding-window layers is not "
                             "supported (only on the full-attention layers)")
        if local.get("rope_theta") is not None:
            return float(local["rope_theta"])
    return float(cfg.get("rope_local_base_freq") or GEMMA3_LOCAL_ROPE_THETA)


def smollm3_rope_layers(cfg: dict[str, Any]) -> list[int]:
    """SmolLM3's ``no_rope_layers``: per layer 1 (RoPE) or 0 (none); when
    absent, every ``no_rope_layer_interval``-th layer (default 4) has none."""
    num_layers = int(cfg["num_hidden_layers"])
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = int(cfg.get("no_rope_layer_interval") or 4)
        return [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) < num_layers:  # transformers indexes it by layer: at least one entry each
        raise ValueError(f"no_rope_layers has {len(flags)} entries for {num_layers} layers")
    return [int(f) for f in flags[:num_layers]]


def _head_dim(cfg: dict[str, Any], default: int | None = None) -> int:
    if default is not None and "head_dim" not in cfg:
        return default
    return int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))


def _rotary_dim(cfg: dict[str, Any], family: str) -> int | None:
    # top level (transformers < 5) or inside rope_parameters / rope_scaling
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    factor = float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor")
                   or (cfg.get("rotary_pct") if family == "gpt_neox" else None)  # its older name
                   or _DEFAULT_ROTARY_FACTOR.get(family, 1.0))
    if factor == 1.0:
        return None
    # StableLM and GPT-NeoX split hidden_size over the heads whatever head_dim says
    head_dim = (int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
                if family in ("stablelm", "gpt_neox")
                else _head_dim(cfg))
    dim = int(head_dim * factor)
    if not 0 < dim <= head_dim or dim % 2:
        raise ValueError(f"partial_rotary_factor {factor} gives {dim} rotated dims of {head_dim}; "
                         "an even number in (0, head_dim] is needed")
    return dim


def _multiplier(cfg: dict[str, Any], key: str) -> float:
    # Granite's scalars: 1.0 when absent, as transformers defaults them
    value = cfg.get(key)
    value = 1.0 if value is None else float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{key} must be a positive number, got {cfg.get(key)!r}")
    return value


def _cap(cfg: dict[str, Any], key: str, default: float | None = None) -> float:
    """A soft cap from config.json: ``default`` (the config class's) where the
    key is absent, 0 (none) where it is null."""
    value = cfg.get(key, default)
    if value is None:
        return 0.0
    if float(value) <= 0:
        raise ValueError(f"{key} must be positive or null, got {value!r}")
    return float(value)


def _no_bidirectional(cfg: dict[str, Any]) -> None:
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention is set: an encoder (embedding) checkpoint, "
                         "not a causal language model")
