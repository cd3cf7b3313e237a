"""Families whose config.json is written in other keys than the Llama-style
ones (GPT-2's ``n_embd``, OPT's ``ffn_dim``, Falcon's ``n_head``...).

Each such family has a ``Dialect`` in its own module of this package, named
in ``DIALECTS``. ``ModelConfig.from_hf`` hands the family's config.json to
``Dialect.llama_keys`` first and reads the result as it reads a Llama
config.json, with these meanings:

- ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
  ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
  ``max_position_embeddings``, ``vocab_size``, ``tie_word_embeddings``,
  ``rms_norm_eps`` (the epsilon of whatever norm the family uses),
  ``rope_theta`` / ``rope_parameters`` as in Llama;
- ``attention_bias``: the q/k/v projections carry biases;
  ``attention_out_bias``: the output projection does (default: as
  ``attention_bias``); ``mlp_bias``: the MLP projections do;
- ``qk_norm``: RMSNorm on each head's q and k before RoPE (Qwen3);
- a mixture of experts in the Qwen keys (``num_experts``,
  ``num_experts_per_tok``, ``moe_intermediate_size``, ``norm_topk_prob``,
  ``decoder_sparse_step``, ``mlp_only_layers``, ``shared_expert_intermediate_size``:
  an ungated shared expert unless the family's sparse MLP gates it), and
  ``moe_routing``: ``MoEConfig`` routing fields as they are (GLM-4.5's router,
  gpt-oss's clamped SwiGLU experts);
- sliding windows in the Qwen keys (``use_sliding_window``,
  ``sliding_window``, ``layer_types``).

``Dialect.options`` gives the family's ``FamilyOptions`` from the original
config.json. Both raise ``ValueError`` for what the family's implementation
cannot express; ``from_hf`` turns it into a ``CheckpointError`` naming the
file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from splitserve.engine.family_config import PLAIN_ACTIVATIONS, FamilyOptions


@dataclass(frozen=True)
class Dialect:
    architectures: tuple[str, ...]  # config.json ``architectures`` entries of the family
    llama_keys: Callable[[dict[str, Any]], dict[str, Any]]
    options: Callable[[dict[str, Any]], FamilyOptions]
    # config.json ``model_type`` values that pick the family whatever ``architectures`` names
    # (transformers saves Sarvam MoE as ``Glm4MoeForCausalLM``, the class it runs it with)
    model_types: tuple[str, ...] = ()


def dialect_architectures() -> dict[str, str]:
    """architecture name -> family, for every dialect family."""
    return {arch: family for family, d in DIALECTS.items() for arch in d.architectures}


def dialect_model_types() -> dict[str, str]:
    """model_type -> family, for the dialect families that claim a model_type."""
    return {t: family for family, d in DIALECTS.items() for t in d.model_types}


def required(cfg: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` that config.json holds (families renamed keys
    over time); a ``KeyError`` naming the first when none is there."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise KeyError(keys[0])


def passed_keys(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The keys read as Llama's (``defaults``' names) from ``cfg``, else their
    default; a default of None leaves an absent key out."""
    out = {k: cfg.get(k, default) for k, default in defaults.items()}
    return {k: v for k, v in out.items() if v is not None}


def plain_activation(cfg: dict[str, Any], family: str, default: str,
                     key: str = "activation_function") -> str:
    """config.json's ``key`` (its ``default`` when absent) as the ungated
    MLP's ``FamilyOptions.hidden_act``."""
    name = cfg.get(key) or default
    if name not in PLAIN_ACTIVATIONS:
        raise ValueError(f"{key} {name!r} is not supported for {family}; supported: "
                         f"{', '.join(PLAIN_ACTIVATIONS)}")
    return PLAIN_ACTIVATIONS[name]


def refuse_partial_rotary(cfg: dict[str, Any], rope: dict[str, Any], family: str) -> None:
    """A ``ValueError`` for a ``partial_rotary_factor`` other than 1 (in ``rope``, the
    config's rope dict, or at top level) on a family whose every dim rotates."""
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported for {family} (every "
                         "dim rotates)")


def refuse_fp8_checkpoint(cfg: dict[str, Any], family: str, why: str) -> None:
    """A ``ValueError`` for an fp8 checkpoint (a quantization_config) of
    ``family`` whose tensors are split, renamed or reordered at load (``why``)."""
    if cfg.get("quantization_config") is not None:
        raise ValueError(f"quantization_config: fp8 {family} checkpoints are not supported ({why}); "
                         "serve the unquantized checkpoint, with weight_dtype fp8 if wanted")


def wrapped_text_config(cfg: dict[str, Any], architectures: tuple[str, ...], wrapper: str,
                        inherit: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """For a multimodal ``wrapper`` (the first of config.json's architectures
    among ``architectures``), its ``text_config`` with the wrapper's dtype and
    quantization_config (and the ``inherit`` keys) where it has none; None
    for any other architecture (config.json is the text model's own)."""
    archs = [a for a in cfg.get("architectures") or () if a in architectures]
    if archs[:1] != [wrapper]:
        return None
    text = dict(cfg.get("text_config") or {})
    for key in ("torch_dtype", "dtype", "quantization_config", *inherit):
        if text.get(key) is None and cfg.get(key) is not None:
            text[key] = cfg[key]
    return text


# family -> its dialect, one module each in this package (imported here, after
# Dialect and required, which those modules import)
DIALECTS: dict[str, Dialect] = {}

from splitserve.engine.dialects import (  # noqa: E402
    apertus, arcee, bloom, cohere, cohere2, cohere2_moe, cwm, dbrx, deepseek_v2, deepseek_v3,
    dots1, ernie4_5, ernie4_5_moe, exaone, exaone4, exaone_moe, falcon, flex_olmo, gemma4, glm,
    glm4, glm4_moe, glm4_moe_lite, gpt2, gpt_bigcode, gpt_neo, gpt_oss, gptj, granitemoe, hunyuan,
    hunyuan_moe, internlm3, iquestcoder, llama4, minimax_m2, ministral3, mpt, nemotron, olmo,
    olmo3, olmoe, opt, phimoe, vaultgemma, youtu,
)
from splitserve.engine.dialects import codegen, granite_swa, granitemoe_swa  # noqa: E402
from splitserve.engine.dialects import hyperclovax, jais2, solar_open  # noqa: E402
from splitserve.engine.dialects import mimo_v2_flash  # noqa: E402
from splitserve.engine.dialects import axk1, kolibri1, minicpm5_moe  # noqa: E402
from splitserve.engine.dialects import afmoe, nanochat  # noqa: E402
from splitserve.engine.dialects import biogpt, openai_gpt, persimmon, xglm  # noqa: E402
from splitserve.engine.dialects import flint, sarvam_mla, sarvam_moe  # noqa: E402
from splitserve.engine.dialects import hy_v3, longcat_flash  # noqa: E402
from splitserve.engine.dialects import qwen3_next  # noqa: E402
from splitserve.engine.dialects import kimi_linear  # noqa: E402
from splitserve.engine.dialects import qwen3_5  # noqa: E402
from splitserve.engine.dialects import olmo_hybrid  # noqa: E402
from splitserve.engine.dialects import lfm2, lfm2_moe, lfm3  # noqa: E402
from splitserve.engine.dialects import bamba, granitemoehybrid, nemotron_h  # noqa: E402
from splitserve.engine.dialects import recurrent_gemma  # noqa: E402
from splitserve.engine.dialects import jamba, mamba  # noqa: E402
from splitserve.engine.dialects import bailing_hybrid, minimax  # noqa: E402
from splitserve.engine.dialects import falcon_h1, zamba2  # noqa: E402
from splitserve.engine.dialects import mamba2 as mamba2_dialect  # noqa: E402

DIALECTS.update({
    "gpt2": gpt2.DIALECT,
    "opt": opt.DIALECT,
    "falcon": falcon.DIALECT,
    "gptj": gptj.DIALECT,
    "olmoe": olmoe.DIALECT,
    "granitemoe": granitemoe.DIALECT,
    "granitemoeshared": granitemoe.SHARED_DIALECT,
    "cohere": cohere.DIALECT,
    "olmo": olmo.DIALECT,
    "glm": glm.DIALECT,
    "glm4_moe": glm4_moe.DIALECT,
    "dots1": dots1.DIALECT,
    "glm4": glm4.DIALECT,
    "cohere2": cohere2.DIALECT,
    "nemotron": nemotron.DIALECT,
    "arcee": arcee.DIALECT,
    "gpt_bigcode": gpt_bigcode.DIALECT,
    "gpt_neo": gpt_neo.DIALECT,
    "olmo3": olmo3.DIALECT,
    "exaone4": exaone4.DIALECT,
    "ernie4_5": ernie4_5.DIALECT,
    "hunyuan_v1_dense": hunyuan.DIALECT,
    "internlm3": internlm3.DIALECT,
    "apertus": apertus.DIALECT,
    "phimoe": phimoe.DIALECT,
    "dbrx": dbrx.DIALECT,
    "gpt_oss": gpt_oss.DIALECT,
    "llama4": llama4.DIALECT,
    "deepseek_v2": deepseek_v2.DIALECT,
    "deepseek_v3": deepseek_v3.DIALECT,
    "bloom": bloom.DIALECT,
    "mpt": mpt.DIALECT,
    "flex_olmo": flex_olmo.DIALECT,
    "minimax_m2": minimax_m2.DIALECT,
    "ernie4_5_moe": ernie4_5_moe.DIALECT,
    "hunyuan_v1_moe": hunyuan_moe.DIALECT,
    "exaone": exaone.DIALECT,
    "vaultgemma": vaultgemma.DIALECT,
    "granite_swa": granite_swa.DIALECT,
    "granitemoe_swa": granitemoe_swa.DIALECT,
    "codegen": codegen.DIALECT,
    "ministral3": ministral3.DIALECT,
    "cwm": cwm.DIALECT,
    "iquestcoder": iquestcoder.DIALECT,
    "exaone_moe": exaone_moe.DIALECT,
    "cohere2_moe": cohere2_moe.DIALECT,
    "solar_open": solar_open.DIALECT,
    "jais2": jais2.DIALECT,
    "hyperclovax": hyperclovax.DIALECT,
    "glm4_moe_lite": glm4_moe_lite.DIALECT,
    "youtu": youtu.DIALECT,
    "gemma4": gemma4.DIALECT,
    "mimo_v2_flash": mimo_v2_flash.DIALECT,
    "axk1": axk1.DIALECT,
    "kolibri1": kolibri1.DIALECT,
    "minicpm5_moe": minicpm5_moe.DIALECT,
    "nanochat": nanochat.DIALECT,
    "afmoe": afmoe.DIALECT,
    "persimmon": persimmon.DIALECT,
    "xglm": xglm.DIALECT,
    "openai-gpt": openai_gpt.DIALECT,
    "biogpt": biogpt.DIALECT,
    "sarvam_moe": sarvam_moe.DIALECT,
    "param2moe": sarvam_moe.PARAM2_DIALECT,
    "sarvam_mla": sarvam_mla.DIALECT,
    "flint": flint.DIALECT,
    "hy_v3": hy_v3.DIALECT,
    "longcat_flash": longcat_flash.DIALECT,
    "qwen3_next": qwen3_next.DIALECT,
    "kimi_linear": kimi_linear.DIALECT,
    "qwen3_5": qwen3_5.DIALECT,
    "qwen3_5_moe": qwen3_5.MOE_DIALECT,
    "olmo_hybrid": olmo_hybrid.DIALECT,
    "lfm2": lfm2.DIALECT,
    "lfm2_moe": lfm2_moe.DIALECT,
    "lfm3": lfm3.DIALECT,
    "granitemoehybrid": granitemoehybrid.DIALECT,
    "bamba": bamba.DIALECT,
    "nemotron_h": nemotron_h.DIALECT,
    "recurrent_gemma": recurrent_gemma.DIALECT,
    "mamba": mamba.DIALECT,
    "falcon_mamba": mamba.FALCON_DIALECT,
    "jamba": jamba.DIALECT,
    "minimax": minimax.DIALECT,
    "bailing_hybrid": bailing_hybrid.DIALECT,
    "falcon_h1": falcon_h1.DIALECT,
    "zamba2": zamba2.DIALECT,
    "mamba2": mamba2_dialect.DIALECT,
})
