"""OPT (``OPTForCausalLM``): its config.json in the Llama-style keys.

transformers' OPTConfig: ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``ffn_dim`` (the MLP's width),
``max_position_embeddings`` (2048; the learned position table has 2 more
rows, position 0 being row 2), ``activation_function`` (``relu``),
``enable_bias`` (every projection, true), LayerNorm with torch's epsilon
(1e-5), ``tie_word_embeddings`` (true), bos/eos 2; one KV head per query
head. The model (``splitserve.engine.models.opt``) is the shared decoder
with LayerNorm, the plain MLP and the learned position table.

Refused, naming the option: ``do_layer_norm_before: false`` (OPT-350m's
norms after each block), ``word_embed_proj_dim`` other than hidden_size
(its project_in / project_out), ``layer_norm_elementwise_affine: false``
(norms without weights), ``_remove_final_layer_norm``, and fp8 checkpoints
(tensors are renamed at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, required
from splitserve.engine.dialects.gpt2 import passed_keys, plain_activation, refuse_fp8_checkpoint
from splitserve.engine.family_config import FamilyOptions

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
_PASSED = {"bos_token_id": 2, "eos_token_id": 2, "torch_dtype": None, "dtype": None}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden = int(required(cfg, "hidden_size"))
    heads = int(required(cfg, "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    bias = bool(cfg.get("enable_bias", True))
    return {
        "vocab_size": required(cfg, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": required(cfg, "ffn_dim"),
        "num_hidden_layers": required(cfg, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
        "rms_norm_eps": 1e-5,  # nn.LayerNorm's default: OPT names none
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
        "attention_bias": bias,
        "attention_out_bias": bias,
        "mlp_bias": bias,
        **passed_keys(cfg, _PASSED),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    if not cfg.get("do_layer_norm_before", True):
        raise ValueError("do_layer_norm_before: false (OPT-350m's LayerNorm after each block) is not "
                         "supported")
    proj = cfg.get("word_embed_proj_dim")
    if proj is not None and int(proj) != int(required(cfg, "hidden_size")):
        raise ValueError(f"word_embed_proj_dim ({proj}) other than hidden_size "
                         f"({cfg['hidden_size']}) (project_in / project_out) is not supported")
    if not cfg.get("layer_norm_elementwise_affine", True):
        raise ValueError("layer_norm_elementwise_affine: false (LayerNorm without weight and bias) "
                         "is not supported")
    if cfg.get("_remove_final_layer_norm"):
        raise ValueError("_remove_final_layer_norm (no final LayerNorm) is not supported")
    refuse_fp8_checkpoint(cfg, "OPT", "its tensors are renamed at load")
    return FamilyOptions(
        hidden_act=plain_activation(cfg, "opt", "relu"),
        layer_norm=True,
        plain_mlp=("fc1", "fc2"),
        o_proj_name="out_proj",
        position_table="model.embed_positions",
        position_offset=POSITION_OFFSET,
    )


DIALECT = Dialect(architectures=("OPTForCausalLM",), llama_keys=llama_keys, options=options)
