"""OPT (``OPTForCausalLM``): its config.json in the Llama-style keys.

transformers' OPTConfig: ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``ffn_dim`` (the MLP's width),
``max_position_embeddings`` (2048; the learned position table has 2 more
rows, position 0 being row 2), ``activation_function`` (``relu``),
``enable_bias`` (every projection, true), LayerNorm with torch's epsilon
(1e-5), ``tie_word_embeddings`` (true), bos/eos 2; one KV head per query
head. The model (``splitserve.engine.models.opt``) is the shared decoder
with LayerNorm, the plain MLP and the learned position table.

``do_layer_norm_before: false`` (OPT-350m: norms after each block's
residual add, no final norm), ``_remove_final_layer_norm`` and a
``word_embed_proj_dim`` other than hidden_size (embeddings projected in
and out) are options of the model. Refused, naming the option:
``layer_norm_elementwise_affine: false`` (norms without weights) and fp8
checkpoints (tensors are renamed at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint, required
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
    if not cfg.get("layer_norm_elementwise_affine", True):
        raise ValueError("layer_norm_elementwise_affine: false (LayerNorm without weight and bias) "
                         "is not supported")
    refuse_fp8_checkpoint(cfg, "OPT", "its tensors are renamed at load")
    hidden = int(required(cfg, "hidden_size"))
    proj = cfg.get("word_embed_proj_dim")  # None: hidden_size, as OPTConfig fills it
    proj = hidden if proj is None else int(proj)
    if proj <= 0:
        raise ValueError(f"word_embed_proj_dim must be positive, got {proj}")
    pre_norm = bool(cfg.get("do_layer_norm_before", True))
    return FamilyOptions(
        hidden_act=plain_activation(cfg, "opt", "relu"),
        layer_norm=True,
        plain_mlp=("fc1", "fc2"),
        o_proj_name="out_proj",
        position_table="model.embed_positions",
        position_offset=POSITION_OFFSET,
        norm_after_block=not pre_norm,
        # OPTDecoder builds its final_layer_norm only before-block and not removed
        final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
        embed_proj_dim=0 if proj == hidden else proj,
    )


DIALECT = Dialect(architectures=("OPTForCausalLM",), llama_keys=llama_keys, options=options)
