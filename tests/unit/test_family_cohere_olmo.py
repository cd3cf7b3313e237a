"""config.json parsing of the Cohere (Command-R), OLMo (1) and GLM families:
the defaults transformers' config classes fill in, the options read, the
norms against transformers' own classes, and a clear CheckpointError for
what the engine does not support. Token parity is in test_model_parity /
test_engine_parity (variants cohere, cohere_qk_norm, olmo, glm) and, at
tensor_parallel_size 2, test_tp_engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.float_layer_norm import FloatLayerNorm
from splitserve.engine.parallel.plan import check
from tests.fixtures.checkpoints import hf_model


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, **extra}


def test_cohere_defaults():
    # rms_norm_eps, mlp_bias, sliding_window and num_experts are not Cohere's keys: ignored
    cfg = ModelConfig.from_hf(raw("CohereForCausalLM", rms_norm_eps=0.5, mlp_bias=True,
                                  sliding_window=8, use_sliding_window=True, num_experts=4))
    assert cfg.family == "cohere"
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 500000.0 and cfg.tie_word_embeddings
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (False, False, False)
    assert cfg.layer_windows == (0, 0) and cfg.moe is None and not cfg.qk_norm
    opts = cfg.options
    assert (opts.float_layer_norm, opts.parallel_residual, opts.interleaved_rope) == ("cohere", True, True)
    assert opts.logit_scale == 0.0625 and not opts.head_qk_layer_norm and not opts.layer_norm
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (5, (255001,))
    cfg = ModelConfig.from_hf(raw("CohereForCausalLM", layer_norm_eps=1e-3, attention_bias=True,
                                  logit_scale=0.125, use_qk_norm=True, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 8e6}))
    assert cfg.rms_norm_eps == 1e-3 and cfg.rope_theta == 8e6 and not cfg.tie_word_embeddings
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, False)
    assert cfg.options.logit_scale == 0.125 and cfg.options.head_qk_layer_norm
    assert ModelConfig.from_hf(raw("CohereForCausalLM")).max_position == 256
    del_max = raw("CohereForCausalLM")
    del del_max["max_position_embeddings"]
    assert ModelConfig.from_hf(del_max).max_position == 8192


def test_olmo_defaults():
    # OlmoLayerNorm's eps is 1e-5 whatever config.json says
    cfg = ModelConfig.from_hf(raw("OlmoForCausalLM", rms_norm_eps=0.5, layer_norm_eps=0.5))
    assert cfg.family == "olmo" and cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings
    assert cfg.options.float_layer_norm == "none" and cfg.options.clip_qkv is None
    assert cfg.rope_theta == 10000.0 and cfg.eos_token_ids == (50279,) and cfg.bos_token_id is None
    cfg = ModelConfig.from_hf(raw("OlmoForCausalLM", clip_qkv=8, attention_bias=True))
    assert cfg.options.clip_qkv == 8.0
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, False)


def test_glm_defaults():
    cfg = ModelConfig.from_hf(raw("GlmForCausalLM", num_key_value_heads=None))
    # no head_dim key: 128, half of it rotating; no num_key_value_heads value: all heads
    assert cfg.family == "glm" and cfg.head_dim == 128 and cfg.options.rotary_dim == 64
    assert cfg.rms_norm_eps == 1.5625e-7 and not cfg.tie_word_embeddings
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, False, False)
    assert cfg.eos_token_ids == (151329, 151336, 151338) and cfg.options.interleaved_rope
    nested = raw("GlmForCausalLM", head_dim=16, attention_bias=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25})
    del nested["num_key_value_heads"]  # transformers' default: 2
    cfg = ModelConfig.from_hf(nested)
    assert (cfg.options.rotary_dim, cfg.rope_theta, cfg.attention_bias, cfg.num_kv_heads) == (4, 500.0, False, 2)
    full = ModelConfig.from_hf(raw("GlmForCausalLM", head_dim=16, partial_rotary_factor=1.0))
    assert full.options.rotary_dim is None


@pytest.mark.parametrize("arch, extra, match", [
    ("CohereForCausalLM", {"logit_scale": 0}, "logit_scale must be a positive number"),
    ("CohereForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ("CohereForCausalLM", {"hidden_act": "relu"}, "activation 'relu' is not supported for cohere"),
    ("CohereForCausalLM", {"quantization_config": {"quant_method": "fp8"}},
     "fp8 CohereForCausalLM checkpoints are not supported"),
    ("GlmForCausalLM", {"head_dim": 16, "partial_rotary_factor": 0.1}, "gives 1 rotated dims of 16"),
    ("GlmForCausalLM", {"quantization_config": {"quant_method": "fp8"}},
     "fp8 GlmForCausalLM checkpoints are not supported"),
    ("OlmoForCausalLM", {"clip_qkv": -1}, "clip_qkv must be a positive number"),
    ("OlmoForCausalLM", {"hidden_act": "gelu"}, "activation 'gelu' is not supported for olmo"),
])
def test_unsupported_options_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


def test_both_split_over_tensor_parallel_ranks():
    for cfg in (ModelConfig.from_hf(raw("CohereForCausalLM", use_qk_norm=True)),
                ModelConfig.from_hf(raw("OlmoForCausalLM", clip_qkv=1.0))):
        check(cfg, 2)  # no refusal: test_tp_engine checks their tokens at TP=2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_layer_norm_matches_transformers(dtype):
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

    x = (torch.randn(5, 4, 16) * 3 + 1).to(dtype)
    ref = CohereLayerNorm((4, 16), eps=1e-3).to(dtype)  # Cohere's per-head q/k norm shape
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(4, 16))
    ours = FloatLayerNorm((4, 16), 1e-3, dtype, "cpu", cohere=True)
    ours.weight.data.copy_(ref.weight)
    # each computed by its family's formula: equal to the last bit, in bf16 too
    assert torch.equal(ours(x)[0], ref(x))
    plain = FloatLayerNorm((16,), 1e-5, dtype, "cpu", weight=False)
    assert plain.weight is None
    assert torch.equal(plain(x)[0], OlmoLayerNorm(16)(x))


def test_olmo_variant_clip_binds(tiny_checkpoints):
    # the parity variant's clip_qkv clamps part of layer 0's q/k/v (else parity proves nothing)
    ref = hf_model(tiny_checkpoints["olmo"])
    clip = ref.config.clip_qkv
    attn = ref.model.layers[0].self_attn
    x = F.layer_norm(ref.model.embed_tokens.weight[:64], (ref.config.hidden_size,), eps=1e-5)
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            out = proj(x).abs()
            assert (out > clip).any() and (out < clip).any()


@pytest.mark.parametrize("variant", ["cohere_qk_norm", "glm"])
def test_lora_stacks_on_attention_and_mlp(tiny_checkpoints, variant):
    # their q/k lora_B rows reordered as the weights' (PEFT parity: test_lora_engine)
    model = load_model(load_checkpoint(tiny_checkpoints[variant]), torch.float32)
    assert {name for _, name in model.enable_lora(2, 4)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
