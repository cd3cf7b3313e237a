"""BioGPT (``BioGptForCausalLM``): its config.json in the Llama-style keys.

transformers' BioGptConfig: Llama's names for the shape (``hidden_size``,
``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``),
``max_position_embeddings`` (1024; the learned position table has 2 more
rows, position 0 being row 2, as OPT's), ``hidden_act`` (``gelu``, erf),
``scale_embedding`` (true: token embeddings times sqrt(hidden_size)),
``tie_word_embeddings`` (true), bos 0, eos 2; every projection has a bias,
one KV head per query head. Its LayerNorms use torch's epsilon (1e-5):
transformers' BioGPT does not read ``layer_norm_eps``. The model
(``splitserve.engine.models.biogpt``) is OPT's with scaled embeddings.

Refused: fp8 checkpoints (tensors are renamed at load).
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint, required
from splitserve.engine.dialects.opt import POSITION_OFFSET
from splitserve.engine.family_config import FamilyOptions

_PASSED = {"bos_token_id": 0, "eos_token_id": 2, "torch_dtype": None, "dtype": None,
           "max_position_embeddings": 1024, "tie_word_embeddings": True}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden = int(required(cfg, "hidden_size"))
    heads = int(required(cfg, "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    return {
        "vocab_size": required(cfg, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": required(cfg, "intermediate_size"),
        "num_hidden_layers": required(cfg, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,  # nn.LayerNorm's default: BioGPT's layers ignore layer_norm_eps
        "attention_bias": True,
        "attention_out_bias": True,
        "mlp_bias": True,
        **passed_keys(cfg, _PASSED),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "BioGPT", "its tensors are renamed at load")
    hidden = int(required(cfg, "hidden_size"))
    return FamilyOptions(
        hidden_act=plain_activation(cfg, "biogpt", "gelu", key="hidden_act"),
        layer_norm=True,
        plain_mlp=("fc1", "fc2"),
        o_proj_name="out_proj",
        position_table="model.embed_positions",
        position_offset=POSITION_OFFSET,
        embed_scale=math.sqrt(hidden) if cfg.get("scale_embedding", True) else 1.0,
    )


DIALECT = Dialect(architectures=("BioGptForCausalLM",), llama_keys=llama_keys, options=options)
