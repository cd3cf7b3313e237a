"""config.json parsing of EXAONE 3.0 / 3.5 (its own key names) and VaultGemma
(Gemma 2's options without the post-norms): the defaults transformers'
ExaoneConfig / VaultGemmaConfig fill in (checked against those classes),
tensor parallelism, and a clear CheckpointError for what the engine does not
support (fp8 checkpoints, LoRA adapters, other activations, windows);
``weight_dtype: fp8`` quantizing their renamed projections at load.
Token parity is in test_model_parity / test_engine_parity (variants exaone,
vaultgemma) and at tensor_parallel_size 2 in test_tp_engine."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.parallel.plan import check
from tests.unit.test_family_olmo3_exaone import hf_config, raw
from tests.unit.test_fp8_engine import LOGIT_REL_BOUND
from tests.unit.test_model_parity import prompt_logits


def exaone(**extra) -> dict:
    """A config.json in EXAONE's own key names, as the hub's checkpoints write it."""
    c = raw("ExaoneForCausalLM", num_layers=3, layer_norm_epsilon=1e-3, activation_function="gelu_pytorch_tanh")
    del c["num_hidden_layers"]
    return {**c, **extra}


def test_exaone_keys_and_defaults_as_transformers_reads_them():
    c = exaone()
    del c["num_key_value_heads"], c["head_dim"]
    ours, ref = ModelConfig.from_hf(c), hf_config("ExaoneConfig", c)
    assert ours.family == "exaone" and ours.num_layers == ref.num_hidden_layers == 3
    assert ours.rms_norm_eps == ref.rms_norm_eps == 1e-3 and ours.options.hidden_act == "gelu_tanh"
    assert ours.num_kv_heads == ref.num_key_value_heads == 8
    assert ours.head_dim == ref.head_dim == 16 and ours.rope_theta == 500000.0
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (361,)) and not ours.tie_word_embeddings
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (False, False, False)
    ours = ModelConfig.from_hf(exaone(attention_bias=True, mlp_bias=True, num_key_value_heads=None,
                                      rope_theta=7.0))
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (True, True, True)
    assert ours.num_kv_heads == 4 and ours.rope_theta == 7.0
    # transformers' own key names are read too
    ours = ModelConfig.from_hf(raw("ExaoneForCausalLM", rms_norm_eps=1e-4, hidden_act="silu"))
    assert ours.num_layers == 2 and ours.rms_norm_eps == 1e-4 and ours.options.hidden_act == "silu"


@pytest.mark.parametrize("extra, match", [
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 ExaoneForCausalLM checkpoints are not supported"),
    ({"activation_function": "swish_x"}, "activation 'swish_x' is not supported for exaone"),
])
def test_exaone_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(exaone(**extra))


def test_exaone_tensor_parallel_and_lora_refusal(tiny_checkpoints):
    check(ModelConfig.from_hf(exaone()), 2)  # test_tp_engine checks its tokens at TP=2
    model = load_model(load_checkpoint(tiny_checkpoints["exaone"]), torch.float32)
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for EXAONE 3"):
        model.enable_lora(2, 4)


def test_vaultgemma_defaults_as_transformers_reads_them():
    c = raw("VaultGemmaForCausalLM", num_hidden_layers=3)
    del c["head_dim"]
    ours, ref = ModelConfig.from_hf(c), hf_config("VaultGemmaConfig", c)
    assert ours.family == "vaultgemma" and ours.head_dim == ref.head_dim == 256
    assert ours.layer_windows == tuple(4096 if t == "sliding_attention" else 0 for t in ref.layer_types)
    assert ours.layer_windows == (4096, 0, 4096) and ours.tie_word_embeddings and ours.rms_norm_eps == 1e-6
    opts = ours.options
    assert not opts.sandwich_norms and opts.norm_plus_one and opts.embed_scale == 8.0
    assert (opts.attn_softcap, opts.final_softcap) == (50.0, 30.0) and opts.attn_scale == 256 ** -0.5
    assert opts.hidden_act == "gelu_tanh" and (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (False,) * 3
    ours = ModelConfig.from_hf(raw("VaultGemmaForCausalLM", sliding_window=None,
                                   layer_types=["full_attention"] * 2, attention_bias=True))
    assert ours.layer_windows == (0, 0) and ours.attention_bias and ours.o_proj_bias


@pytest.mark.parametrize("extra, match", [
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 VaultGemmaForCausalLM checkpoints are not supported"),
    ({"hidden_activation": "relu"}, "activation 'relu' is not supported for gemma2"),
    ({"sliding_window": None}, "sliding_window is null but layer_types"),
    ({"layer_types": ["chunked_attention"] * 2}, "'chunked_attention'] are not supported for vaultgemma"),
])
def test_vaultgemma_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw("VaultGemmaForCausalLM", **extra))


def test_vaultgemma_tensor_parallel_and_lora_refusal(tiny_checkpoints):
    check(ModelConfig.from_hf(raw("VaultGemmaForCausalLM")), 2)  # test_tp_engine checks its tokens
    model = load_model(load_checkpoint(tiny_checkpoints["vaultgemma"]), torch.float32)
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for VaultGemma"):
        model.enable_lora(2, 4)


@pytest.mark.parametrize("variant", ["exaone", "vaultgemma"])
def test_weight_dtype_fp8_quantizes_at_load(tiny_checkpoints, parity_models, variant):
    # the renamed projections, quantized once loaded
    model = load_model(load_checkpoint(tiny_checkpoints[variant]), torch.float32, weight_dtype="fp8")
    layer = model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn == layer.mlp.down_proj.weight.dtype
    full, _ = parity_models(variant)
    logits, ref = prompt_logits(model), prompt_logits(full)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < LOGIT_REL_BOUND
