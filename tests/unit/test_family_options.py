"""config.json parsing of the Ministral, Seed-OSS, Helium, StarCoder2, Phi and
StableLM families: the defaults transformers' config classes fill in when a
key is absent, the options read, and a clear CheckpointError (or tensor
parallel refusal) for what the engine does not support. Token parity is in
test_model_parity / test_engine_parity."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.helium import deinterleave_heads
from splitserve.engine.models.layers import LayerNorm
from splitserve.engine.models.plain_blocks import ParallelDecoderLayer, PlainMLP
from splitserve.engine.parallel.plan import TensorParallelConfigError, check


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, **extra}


# --- Ministral --------------------------------------------------------------

@pytest.mark.parametrize("extra, windows", [
    ({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}, (0, 8)),
    ({"sliding_window": 8}, (8, 8)),  # no layer_types: every layer slides
    ({}, (4096, 4096)),  # no sliding_window key: transformers' default window
    ({"sliding_window": None}, (0, 0)),
])
def test_ministral_layer_windows(extra, windows):
    cfg = ModelConfig.from_hf(raw("MinistralForCausalLM", **extra))
    assert cfg.layer_windows == windows
    assert cfg.sliding_window == (max(windows) or None)
    # Ministral's projections never carry biases, whatever attention_bias says
    biased = ModelConfig.from_hf(raw("MinistralForCausalLM", attention_bias=True, **extra))
    assert not (biased.attention_bias or biased.o_proj_bias or biased.mlp_bias)


@pytest.mark.parametrize("extra, match", [
    ({"sliding_window": None, "layer_types": ["sliding_attention", "full_attention"]},
     "sliding_window is null"),
    ({"sliding_window": 8, "layer_types": ["sliding_attention"]}, "1 entries for 2 layers"),
    ({"sliding_window": 8, "layer_types": ["chunked_attention"] * 2}, "chunked_attention"),
])
def test_ministral_bad_layer_types_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw("MinistralForCausalLM", **extra))


# --- Seed-OSS and Helium ------------------------------------------------------

def test_seed_oss_defaults_and_separate_output_bias():
    cfg = ModelConfig.from_hf(raw("SeedOssForCausalLM"))
    # attention_bias defaults on (q/k/v), attention_out_bias off, head_dim 128 when absent
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias, cfg.head_dim) == (True, False, False, 128)
    cfg = ModelConfig.from_hf(raw("SeedOssForCausalLM", attention_bias=False, attention_out_bias=True,
                                  mlp_bias=True, head_dim=None))
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias, cfg.head_dim) == (False, True, True, 16)


def test_helium_defaults():
    cfg = ModelConfig.from_hf(raw("HeliumForCausalLM", head_dim=16))
    assert cfg.rms_norm_eps == 1e-8 and cfg.rope_theta == 100_000.0
    assert cfg.options.interleaved_rope and cfg.options.norm_fp32_product
    assert not cfg.o_proj_bias
    wide = raw("HeliumForCausalLM", hidden_size=512)  # no head_dim key: 128, 4 x 128 = 512
    assert ModelConfig.from_hf(wide).head_dim == 128


def test_helium_refuses_heads_not_spanning_hidden_size():
    with pytest.raises(CheckpointError, match=r"num_attention_heads \* head_dim \(4 \* 32\)"):
        ModelConfig.from_hf(raw("HeliumForCausalLM", head_dim=32))  # 4 x 32 != 64


def test_helium_refuses_fp8_checkpoints(tiny_checkpoints):
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [16, 16]}
    with pytest.raises(CheckpointError, match="fp8 HeliumForCausalLM checkpoints are not supported"):
        ModelConfig.from_hf(raw("HeliumForCausalLM", head_dim=16, quantization_config=quant))


def test_deinterleave_turns_pairwise_rotation_into_rotate_half():
    # transformers' Helium rotation of x equals the rotate-half rotation of the
    # reordered x, reordered: checked on one head at one position
    d, theta = 8, 0.7
    x = torch.randn(d)
    freqs = theta * torch.arange(d // 2, dtype=torch.float)
    cos, sin = freqs.cos().repeat_interleave(2), freqs.sin().repeat_interleave(2)
    pairwise = x * cos + torch.stack((-x[1::2], x[0::2]), dim=-1).flatten() * sin
    y = deinterleave_heads(x, d)
    c, s = freqs.cos().repeat(2), freqs.sin().repeat(2)
    half = y * c + torch.cat((-y[d // 2:], y[:d // 2])) * s
    torch.testing.assert_close(half, deinterleave_heads(pairwise, d))


# --- StarCoder2, Phi, StableLM ----------------------------------------------

def test_starcoder2_options():
    cfg = ModelConfig.from_hf(raw("Starcoder2ForCausalLM", sliding_window=8, norm_epsilon=1e-4))
    assert cfg.tie_word_embeddings  # transformers' default for StarCoder2
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)
    assert cfg.layer_windows == (8, 8) and cfg.rms_norm_eps == 1e-4
    assert cfg.options.layer_norm and cfg.options.plain_mlp == ("c_fc", "c_proj")
    assert cfg.options.hidden_act == "gelu_tanh"
    plain = ModelConfig.from_hf(raw("Starcoder2ForCausalLM", use_bias=False, hidden_act="gelu"))
    assert (plain.attention_bias, plain.o_proj_bias, plain.mlp_bias) == (False, False, False)
    assert plain.options.hidden_act == "gelu"


def test_phi_and_stablelm_rotary_defaults():
    phi = ModelConfig.from_hf(raw("PhiForCausalLM"))  # no partial_rotary_factor: 0.5
    assert phi.options.rotary_dim == 8 and phi.options.parallel_residual
    assert phi.options.lm_head_bias and phi.options.o_proj_name == "dense"
    assert phi.options.final_norm_name == "model.final_layernorm"
    stable = ModelConfig.from_hf(raw("StableLmForCausalLM"))  # 0.25
    assert stable.options.rotary_dim == 4 and not stable.options.parallel_residual
    assert not stable.attention_bias and not stable.o_proj_bias


def test_gpt_neox_options_and_older_key_names():
    cfg = ModelConfig.from_hf(raw("GPTNeoXForCausalLM", rotary_pct=0.5, rotary_emb_base=500.0))
    assert cfg.num_kv_heads == cfg.num_heads == 4  # no GQA, whatever num_key_value_heads says
    assert cfg.options.rotary_dim == 8 and cfg.rope_theta == 500.0
    assert cfg.options.parallel_residual and cfg.options.parallel_mlp_norm
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)
    assert cfg.options.hidden_act == "gelu" and cfg.rms_norm_eps == 1e-5
    seq = ModelConfig.from_hf(raw("GPTNeoXForCausalLM", use_parallel_residual=False, attention_bias=False))
    assert not seq.options.parallel_residual and seq.options.rotary_dim == 4  # default 0.25
    assert not (seq.attention_bias or seq.o_proj_bias) and seq.mlp_bias


def test_gpt_neox_layers_keep_both_norms(parity_models):
    model, _ = parity_models("gpt_neox")
    layer = model.layers[0]
    assert isinstance(layer, ParallelDecoderLayer) and isinstance(layer.post_attention_layernorm, LayerNorm)


@pytest.mark.parametrize("arch, extra, match", [
    ("PhiForCausalLM", {"qk_layernorm": True}, "qk_layernorm"),
    ("StableLmForCausalLM", {"qk_layernorm": True}, "qk_layernorm"),
    ("Starcoder2ForCausalLM", {"hidden_act": "swiglu_custom"}, "activation 'swiglu_custom'"),
    ("StableLmForCausalLM", {"hidden_act": "gelu"}, "activation 'gelu' is not supported for stablelm"),
    ("PhiForCausalLM", {"partial_rotary_factor": 0.2}, "gives 3 rotated dims of 16"),
])
def test_unsupported_options_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


def test_layers_built_from_the_options(parity_models):
    phi, _ = parity_models("phi")
    layer = phi.layers[0]
    assert isinstance(layer, ParallelDecoderLayer) and isinstance(layer.mlp, PlainMLP)
    assert isinstance(layer.input_layernorm, LayerNorm) and layer.post_attention_layernorm is None
    assert phi.lm_head_bias is not None
    ministral, _ = parity_models("ministral")  # layer_types: sliding (8), full
    assert [layer.self_attn.sliding_window for layer in ministral.layers] == [8, 0]
    starcoder, _ = parity_models("starcoder2")
    assert type(starcoder.layers[0]) is not ParallelDecoderLayer
    assert isinstance(starcoder.norm, LayerNorm) and starcoder.lm_head is None


@pytest.mark.parametrize("arch", ["Starcoder2ForCausalLM", "PhiForCausalLM", "StableLmForCausalLM",
                                  "GPTNeoXForCausalLM"])
def test_tensor_parallel_splits_layer_norm_families_by_their_heads(arch):
    # LayerNorms whole on every rank; heads and the (ungated) MLP split as Llama's
    check(ModelConfig.from_hf(raw(arch)), 2)
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(4\) is not a multiple"):
        check(ModelConfig.from_hf(raw(arch)), 3)


@pytest.mark.parametrize("arch", ["MinistralForCausalLM", "SeedOssForCausalLM", "HeliumForCausalLM"])
def test_tensor_parallel_allowed_for_llama_like_families(arch):
    check(ModelConfig.from_hf(raw(arch, head_dim=16)), 2)
