"""Qwen3.5 (``Qwen3_5ForCausalLM``, transformers' ``qwen3_5_text``; and the text
model of ``Qwen3_5ForConditionalGeneration``, model_type qwen3_5, from its
``text_config``) and Qwen3.5-MoE (``Qwen3_5MoeForCausalLM``, ``qwen3_5_moe_text``,
and ``Qwen3_5MoeForConditionalGeneration``'s text model): their config.json in
Llama's keys, and their ``FamilyOptions``.

Qwen3-Next's layers (``splitserve.engine.dialects.qwen3_next``) as
transformers' Qwen3_5TextConfig and its model read them, bar:

- the Gated DeltaNet's projections stored apart (``in_proj_qkv``,
  ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), not grouped per key head;
- Qwen3.5: a dense MLP in every layer (``intermediate_size`` 12288);
  defaults: 32 layers of 4096, 16 heads, 4 KV heads, a vocabulary of 248320;
- Qwen3.5-MoE: Qwen2-MoE's sparse MLP in every layer (``decoder_sparse_step``
  and ``mlp_only_layers`` are no keys of its config), its top-k softmax
  weights always renormalised (no ``norm_topk_prob``): ``num_experts`` 256,
  top ``num_experts_per_tok`` 8 of ``moe_intermediate_size`` 512, a
  sigmoid-gated shared expert of ``shared_expert_intermediate_size`` 512;
  defaults: 40 layers of 2048, 16 heads, 2 KV heads, a vocabulary of 248320;
- RoPE through multimodal sections (``mrope_section``, interleaved): a text
  token's position is the same on its time, height and width axes, so every
  section turns by the one position and the table is plain RoPE over
  ``partial_rotary_factor`` (0.25) of each head;
- the wrapper: its text tensors under ``model.language_model.``, the vision
  tower's (``model.visual.``) skipped; its lm_head tied to the embeddings by
  the wrapper's own ``tie_word_embeddings`` (false by default), not the text
  config's.

Refused: activations other than SiLU, sliding windows, a malformed
``mrope_section``, fp8 checkpoints (untested through the renamed and split
tensors). LoRA adapters take the attention, MLP and Gated DeltaNet
projections; tensor parallelism splits the Gated DeltaNet layers by key heads.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, wrapped_text_config
from splitserve.engine.dialects.qwen3_next import hybrid_options, refuse_windows
from splitserve.engine.family_config import FamilyOptions

ARCH = "Qwen3_5ForCausalLM"
WRAPPED = "Qwen3_5ForConditionalGeneration"  # its text model's tensors under model.language_model.
# keys read as Llama's, with transformers' Qwen3_5TextConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
           "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "attention_bias": False, "rope_parameters": None, "rope_scaling": None, "rope_theta": None,
           "torch_dtype": None, "dtype": None, "quantization_config": None, "bos_token_id": None,
           "eos_token_id": None}


def text_config(cfg: dict[str, Any], architectures: tuple[str, ...], wrapper: str) -> dict[str, Any]:
    """The text model's config: ``text_config`` for the multimodal ``wrapper``
    (tied as the wrapper says: transformers ties its lm_head by the wrapper's
    ``tie_word_embeddings``), else config.json itself."""
    text = wrapped_text_config(cfg, architectures, wrapper)
    if text is None:
        return cfg
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return text


def check_mrope(cfg: dict[str, Any]) -> None:
    """The multimodal RoPE sections transformers reads (three: time, height,
    width); any three turn a text token as plain RoPE does."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    if section is not None and (not isinstance(section, (list, tuple)) or len(section) != 3):
        raise ValueError(f"mrope_section {section!r} is not supported (three sections: time, height, "
                         "width, as transformers reads them)")


def dense_keys(cfg: dict[str, Any], passed: dict[str, Any], family: str) -> dict[str, Any]:
    """The Llama keys Qwen3.5 and Qwen3.5-MoE share (no experts)."""
    refuse_windows(cfg, family)
    check_mrope(cfg)
    out = passed_keys(cfg, passed)
    out.update(qk_norm=True, mlp_bias=False, attention_out_bias=False)
    return out


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return dense_keys(text_config(cfg, DIALECT.architectures, WRAPPED), _PASSED, "qwen3_5")


def family_options(text: dict[str, Any], arch: str, family: str, passed: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(text, arch, "untested: its tensors are renamed or split at load")
    # the layer count's default where config.json names none (hybrid_options reads Qwen3-Next's)
    full = {**text, "num_hidden_layers": text.get("num_hidden_layers") or passed["num_hidden_layers"],
            "hidden_size": text.get("hidden_size") or passed["hidden_size"],
            "num_attention_heads": text.get("num_attention_heads") or passed["num_attention_heads"]}
    return FamilyOptions(**hybrid_options(full, family, fused=False))


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return family_options(text_config(cfg, DIALECT.architectures, WRAPPED), ARCH, "qwen3_5", _PASSED)


DIALECT = Dialect(architectures=(ARCH, WRAPPED), llama_keys=llama_keys, options=options)

MOE_ARCH = "Qwen3_5MoeForCausalLM"
MOE_WRAPPED = "Qwen3_5MoeForConditionalGeneration"
# transformers' Qwen3_5MoeTextConfig defaults (it has no intermediate_size: no layer is dense)
_MOE_PASSED = {**_PASSED, "hidden_size": 2048, "num_hidden_layers": 40, "num_key_value_heads": 2}
del _MOE_PASSED["intermediate_size"]
_MOE_DEFAULTS = {"num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
                 "shared_expert_intermediate_size": 512}


def moe_llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    text = text_config(cfg, MOE_DIALECT.architectures, MOE_WRAPPED)
    out = dense_keys(text, _MOE_PASSED, "qwen3_5_moe")
    moe = {k: text.get(k) if text.get(k) is not None else v for k, v in _MOE_DEFAULTS.items()}
    # every layer sparse, every top-k renormalised (Qwen3_5MoeSparseMoeBlock, Qwen3_5MoeTopKRouter)
    out.update(moe, intermediate_size=moe["moe_intermediate_size"], norm_topk_prob=True,
               decoder_sparse_step=1, mlp_only_layers=[])
    return out


def moe_options(cfg: dict[str, Any]) -> FamilyOptions:
    return family_options(text_config(cfg, MOE_DIALECT.architectures, MOE_WRAPPED), MOE_ARCH, "qwen3_5_moe",
                          _MOE_PASSED)


MOE_DIALECT = Dialect(architectures=(MOE_ARCH, MOE_WRAPPED), llama_keys=moe_llama_keys, options=moe_options)
