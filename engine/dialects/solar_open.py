"""Solar Open (``SolarOpenForCausalLM``): GLM-4.5's mixture of experts in
every layer of Llama's decoder, read from config.json as transformers'
``SolarOpenConfig`` does.

- ``n_routed_experts`` (default 128; ``num_local_experts`` its other name)
  experts of ``moe_intermediate_size`` (1280), ``num_experts_per_tok`` (8)
  per token, chosen by GLM-4.5's grouped sigmoid router
  (``splitserve.engine.dialects.glm4_moe.moe_keys``: ``n_group`` and
  ``topk_group``, default 1, ``norm_topk_prob`` (on),
  ``routed_scaling_factor`` (1.0), the checkpoint's
  ``mlp.gate.e_score_correction_bias``), beside ``n_shared_experts`` (1)
  ungated shared experts of ``moe_intermediate_size`` each, summed into one
  SwiGLU MLP;
- what differs from GLM-4.5: every layer is sparse (a
  ``first_k_dense_replace`` or ``intermediate_size`` key is not read, as
  transformers reads neither), no q/k norms (``use_qk_norm`` is not read),
  every dim of each head rotates unless ``partial_rotary_factor`` says
  otherwise, no multi-token-prediction layers;
- ``attention_bias`` covers q/k/v only (o_proj and the MLPs have none);
- defaults: 8 KV heads, head_dim 128, RoPE base 1000000, eps 1e-5,
  untied embeddings, 131072 positions.

Its checkpoints use GLM-4.5's tensor names (``MoECausalLM`` loads them).
Refused: router groups that do not split the experts evenly into groups of
two or more, a ``topk_group`` / ``num_experts_per_tok`` the kept groups
cannot hold, activations other than SiLU, fp8 checkpoints (untested here;
``weight_dtype: fp8`` quantizes at load instead).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.glm import rotary_dim as glm_rotary_dim
from splitserve.engine.dialects.glm4_moe import moe_keys
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions

# Llama's keys, as written, else transformers' SolarOpenConfig default (None: left out)
_PASSED = {"vocab_size": 196608, "hidden_size": 4096, "num_hidden_layers": 48,
           "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
           "rope_parameters": None, "rope_scaling": None, "torch_dtype": None, "dtype": None,
           "quantization_config": None, "bos_token_id": None, "eos_token_id": None,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
           "attention_bias": False}
DEFAULT_THETA = 1_000_000.0  # SolarOpenConfig.default_theta


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if not (isinstance(rope, dict) and rope.get("rope_theta") is not None):
        out["rope_theta"] = cfg.get("rope_theta", DEFAULT_THETA)
    routed = {"n_routed_experts": cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 128,
              "num_experts_per_tok": cfg.get("num_experts_per_tok") or 8,
              "moe_intermediate_size": cfg.get("moe_intermediate_size") or 1280,
              "n_shared_experts": cfg.get("n_shared_experts", 1),
              "first_k_dense_replace": 0}  # every layer sparse, whatever config.json says
    moe = moe_keys({**cfg, **routed}, "solar_open", first_dense=0, norm_topk=True)
    # no layer has a dense MLP: the size read as Llama's is the experts'
    return {**out, **moe, "intermediate_size": moe["moe_intermediate_size"], "qk_norm": False,
            "attention_out_bias": False, "mlp_bias": False}


def rotary_dim(cfg: dict[str, Any]) -> int | None:
    """How many of each head's dims rotate (``partial_rotary_factor``, in
    ``rope_parameters`` or at top level; default 1: all, None)."""
    factor = cfg.get("partial_rotary_factor")
    return glm_rotary_dim({**cfg, "partial_rotary_factor": 1.0 if factor is None else factor},
                          default_head_dim=_PASSED["head_dim"])


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "SolarOpenForCausalLM", "untested: the float32 router and its "
                          "correction bias beside fp8 experts")
    return FamilyOptions(hidden_act=checked_activation(cfg, "solar_open"), rotary_dim=rotary_dim(cfg))


DIALECT = Dialect(architectures=("SolarOpenForCausalLM",), llama_keys=llama_keys, options=options)
