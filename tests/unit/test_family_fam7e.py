"""config.json parsing and refusals of the Persimmon, XGLM, OpenAI GPT and
BioGPT families: the defaults transformers' config classes fill in (checked
against those classes), XGLM's sinusoidal table against transformers' own,
and a clear CheckpointError (or LoRA / tensor-parallel refusal) for what the
engine does not support. Token parity is in test_model_parity /
test_engine_parity (persimmon, xglm, openai_gpt, biogpt)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.xglm import sinusoidal_table
from splitserve.engine.parallel.plan import TensorParallelConfigError, check

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": None}


def hf_config(cls_name: str, cfg: dict):
    import transformers

    return getattr(transformers, cls_name)(**{k: v for k, v in cfg.items() if k != "architectures"})


def refused(cfg: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(cfg)


def persimmon(**extra) -> dict:
    return {"architectures": ["PersimmonForCausalLM"], "vocab_size": 32, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, **extra}


def xglm(**extra) -> dict:
    return {"architectures": ["XGLMForCausalLM"], "vocab_size": 32, "d_model": 64, "ffn_dim": 96,
            "num_layers": 2, "attention_heads": 4, **extra}


def openai_gpt(**extra) -> dict:
    return {"architectures": ["OpenAIGPTLMHeadModel"], "vocab_size": 32, "n_embd": 64, "n_layer": 2,
            "n_head": 4, **extra}


def biogpt(**extra) -> dict:
    return {"architectures": ["BioGptForCausalLM"], "vocab_size": 32, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, **extra}


# --- Persimmon --------------------------------------------------------------------

def test_persimmon_defaults_as_its_config_class():
    raw = persimmon()
    ours, ref = ModelConfig.from_hf(raw), hf_config("PersimmonConfig", raw)
    assert ours.family == "persimmon" and ours.num_kv_heads == 4 and ours.head_dim == 16
    assert ours.rms_norm_eps == ref.layer_norm_eps and ours.qk_norm == ref.qk_layernorm is True
    assert ours.tie_word_embeddings == ref.tie_word_embeddings is False
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    assert ours.max_position == ref.max_position_embeddings
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert ours.options.rotary_dim == int(16 * ref.rope_parameters["partial_rotary_factor"]) == 8
    assert ours.options.hidden_act == "relu2" and ours.options.layer_norm
    assert ours.attention_bias and ours.o_proj_bias and ours.mlp_bias


def test_persimmon_reads_its_options_and_ignores_head_dim():
    cfg = ModelConfig.from_hf(persimmon(qk_layernorm=False, head_dim=32, partial_rotary_factor=0.25,
                                        layer_norm_eps=1e-3, hidden_act="gelu"))
    assert not cfg.qk_norm and cfg.head_dim == 16 and cfg.options.rotary_dim == 4
    assert cfg.rms_norm_eps == 1e-3 and cfg.options.hidden_act == "gelu"


@pytest.mark.parametrize("extra,match", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
    ({"quantization_config": FP8}, "quantization_config"),
    ({"hidden_act": "tanh"}, "hidden_act"),
])
def test_persimmon_refusals_name_the_option(extra, match):
    refused(persimmon(**extra), match)


# --- XGLM -------------------------------------------------------------------------

def test_xglm_defaults_as_its_config_class():
    raw = xglm()
    ours, ref = ModelConfig.from_hf(raw), hf_config("XGLMConfig", raw)
    assert ours.family == "xglm" and (ours.hidden_size, ours.num_layers) == (ref.d_model, ref.num_layers)
    assert ours.intermediate_size == ref.ffn_dim and ours.num_kv_heads == 4
    assert ours.tie_word_embeddings == ref.tie_word_embeddings is True
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    assert ours.max_position == ref.max_position_embeddings and ours.rms_norm_eps == 1e-5
    assert ours.options.embed_scale == 8.0 and ours.options.hidden_act == "gelu"
    assert ours.options.position_pad_row == ref.pad_token_id == 1
    assert ModelConfig.from_hf(xglm(scale_embedding=False)).options.embed_scale == 1.0


@pytest.mark.parametrize("dim,pad", [(64, 1), (63, None), (10, 5)])
def test_xglm_sinusoids_match_transformers(dim, pad):
    from transformers.models.xglm.modeling_xglm import XGLMSinusoidalPositionalEmbedding

    want = XGLMSinusoidalPositionalEmbedding.get_embedding(40, dim, pad)
    assert torch.equal(sinusoidal_table(40, dim, pad), want)


@pytest.mark.parametrize("extra,match", [
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"quantization_config": FP8}, "quantization_config"),
])
def test_xglm_refusals_name_the_option(extra, match):
    refused(xglm(**extra), match)


# --- OpenAI GPT -------------------------------------------------------------------

def test_openai_gpt_defaults_as_its_config_class():
    raw = openai_gpt()
    ours, ref = ModelConfig.from_hf(raw), hf_config("OpenAIGPTConfig", raw)
    assert ours.family == "openai-gpt" and ours.intermediate_size == 4 * ref.n_embd
    assert ours.max_position == ref.n_positions and ours.rms_norm_eps == ref.layer_norm_epsilon
    assert ours.tie_word_embeddings == ref.tie_word_embeddings is True
    assert ours.bos_token_id is ref.bos_token_id is None and ours.eos_token_ids == ()
    opts = ours.options
    assert opts.hidden_act == "gelu_tanh" and opts.norm_after_block and not opts.final_norm
    assert ModelConfig.from_hf(openai_gpt(afn="swish")).options.hidden_act == "silu"


@pytest.mark.parametrize("extra,match", [
    ({"afn": "gelu_new"}, "afn"),
    ({"quantization_config": FP8}, "quantization_config"),
])
def test_openai_gpt_refusals_name_the_option(extra, match):
    refused(openai_gpt(**extra), match)


# --- BioGPT -----------------------------------------------------------------------

def test_biogpt_defaults_as_its_config_class():
    raw = biogpt()
    ours, ref = ModelConfig.from_hf(raw), hf_config("BioGptConfig", raw)
    assert ours.family == "biogpt" and ours.num_kv_heads == 4
    assert ours.max_position == ref.max_position_embeddings
    assert ours.tie_word_embeddings == ref.tie_word_embeddings is True
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    assert ours.rms_norm_eps == 1e-5 != ref.layer_norm_eps  # its nn.LayerNorms ignore the key
    assert ours.options.embed_scale == 8.0 and ours.options.position_offset == 2
    assert ModelConfig.from_hf(biogpt(scale_embedding=False)).options.embed_scale == 1.0


def test_biogpt_refuses_fp8_checkpoints():
    refused(biogpt(quantization_config=FP8), "quantization_config")


# --- all four ---------------------------------------------------------------------

@pytest.mark.parametrize("raw", [persimmon(), xglm(), openai_gpt(), biogpt()],
                         ids=["persimmon", "xglm", "openai_gpt", "biogpt"])
def test_tensor_parallel_splits_by_heads(raw):
    # norms, Persimmon's shared q/k norms and the position tables whole on every rank
    check(ModelConfig.from_hf(raw), 2)
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(\d+\) is not a multiple"):
        check(ModelConfig.from_hf(raw), 3)


@pytest.mark.parametrize("variant", ["persimmon", "xglm", "openai_gpt", "biogpt"])
def test_lora_is_refused(parity_models, variant):
    model, _ = parity_models(variant)
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported"):
        model.enable_lora(1, 4)
