"""config.json parsing and refusals of the AFMoE (Arcee Trinity) and nanochat
families: the defaults transformers' config classes fill in (checked against
those classes), fp8 weights quantized at load, and a clear CheckpointError
(or tensor-parallel / LoRA refusal) for what the engine does not support.
Token parity is in test_moe_parity (afmoe) and test_model_parity /
test_engine_parity (nanochat)."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import prompt_logits

LOGIT_REL_BOUND = 0.1  # fp8 weights: close to the full-precision logits, not equal
# AFMoE's fp8 weights: looser, as a token's sigmoid router may pick another of its 8 experts
MOE_LOGIT_REL_BOUND = 0.25


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, **extra}


def hf_config(cls_name: str, cfg: dict):
    import transformers

    return getattr(transformers, cls_name)(**{k: v for k, v in cfg.items() if k != "architectures"})


def refused(cfg: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=f"config.json: .*{match}"):
        ModelConfig.from_hf(cfg)


# --- AFMoE --------------------------------------------------------------------------

def test_afmoe_defaults_as_its_config_class():
    cfg = raw("AfmoeForCausalLM", num_hidden_layers=8)
    ours, ref = ModelConfig.from_hf(cfg), hf_config("AfmoeConfig", cfg)
    windows = tuple(ref.sliding_window if t == "sliding_attention" else 0 for t in ref.layer_types)
    assert ours.layer_windows == windows == (1024, 1024, 1024, 0) * 2
    assert ours.options.nope_layers == (3, 7) and ours.options.sandwich_norms
    assert ours.options.embed_scale == 1.0 and ours.qk_norm and ours.options.norm_fp32_product
    assert (ours.num_kv_heads, ours.head_dim) == (ref.num_key_value_heads, ref.head_dim) == (4, 128)
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.max_position == ref.max_position_embeddings
    assert ours.tie_word_embeddings == ref.tie_word_embeddings
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    moe = ours.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size) == (
        ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size)
    assert moe.shared_expert_intermediate_size == ref.moe_intermediate_size * ref.num_shared_experts
    assert moe.grouped_sigmoid and moe.renormalize and moe.num_groups == 1
    assert moe.routed_scaling_factor == ref.route_scale
    assert moe.sparse_layers == tuple(i >= ref.num_dense_layers for i in range(8))


def test_afmoe_reads_its_switches():
    cfg = ModelConfig.from_hf(raw("AfmoeForCausalLM", mup_enabled=True, sliding_window=None,
                                  global_attn_every_n_layers=2, num_dense_layers=0, route_scale=2.0))
    assert cfg.options.embed_scale == math.sqrt(64) and cfg.layer_windows == (0,) * 6
    assert cfg.options.nope_layers == (1, 3, 5) and all(cfg.moe.sparse_layers)
    assert cfg.moe.routed_scaling_factor == 2.0


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for afmoe"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 AfmoeForCausalLM checkpoints"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5 is not supported for afmoe"),
    ({"layer_types": ["chunked_attention"] * 6}, r"layer_types \['chunked_attention'\]"),
    ({"num_experts_per_tok": 65}, r"num_experts_per_tok \(65\)"),
])
def test_afmoe_refusals_name_the_option(extra, match):
    refused(raw("AfmoeForCausalLM", **extra), match)


def test_afmoe_refuses_lora_and_tensor_parallel(parity_models):
    model, _ = parity_models("afmoe")
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for AFMoE"):
        model.enable_lora(1, 4)
    with pytest.raises(TensorParallelConfigError, match="gated attention and sigmoid router"):
        check(model.cfg, 2)


def test_afmoe_weight_dtype_fp8_quantizes_at_load(tiny_checkpoints, parity_models):
    model = load_model(load_checkpoint(tiny_checkpoints["afmoe"]), torch.float32, weight_dtype="fp8")
    assert model.layers[0].self_attn.gate_proj.weight.dtype == torch.float8_e4m3fn
    full, _ = parity_models("afmoe")
    logits, ref = prompt_logits(model), prompt_logits(full)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < MOE_LOGIT_REL_BOUND


# --- nanochat -----------------------------------------------------------------------

def test_nanochat_defaults_as_its_config_class():
    cfg = {"architectures": ["NanoChatForCausalLM"]}
    ours, ref = ModelConfig.from_hf(cfg), hf_config("NanoChatConfig", cfg)
    assert (ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads, ours.vocab_size) == (
        ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers, ref.num_attention_heads,
        ref.vocab_size)
    assert ours.num_kv_heads == ref.num_key_value_heads and ours.head_dim == 128
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.max_position == ref.max_position_embeddings
    assert ours.tie_word_embeddings == ref.tie_word_embeddings and not ours.attention_bias
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    opts = ours.options
    assert opts.final_softcap == ref.final_logit_softcapping and opts.hidden_act == "relu2"
    assert opts.plain_mlp == ("fc1", "fc2") and opts.rope_qk_l2_norm
    uncapped = ModelConfig.from_hf({**cfg, "final_logit_softcapping": None})
    assert uncapped.options.final_softcap == 0.0


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "swiglu"}, "hidden_act 'swiglu' is not supported for nanochat"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 NanoChatForCausalLM checkpoints"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
])
def test_nanochat_refusals_name_the_option(extra, match):
    refused(raw("NanoChatForCausalLM", **extra), match)


def test_nanochat_refuses_lora_and_splits_by_heads(parity_models):
    model, _ = parity_models("nanochat")
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for nanochat"):
        model.enable_lora(1, 4)
    check(model.cfg, 2)  # fc1 / fc2 split as up / down, q/k rows negated per head
    with pytest.raises(TensorParallelConfigError, match="NanoChatForCausalLM cannot run at tensor_parallel_size 3"):
        check(model.cfg, 3)


def test_nanochat_weight_dtype_fp8_quantizes_at_load(tiny_checkpoints, parity_models):
    model = load_model(load_checkpoint(tiny_checkpoints["nanochat"]), torch.float32, weight_dtype="fp8")
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    full, _ = parity_models("nanochat")
    logits, ref = prompt_logits(model), prompt_logits(full)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < LOGIT_REL_BOUND
