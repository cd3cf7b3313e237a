"""config.json parsing of Jais 2 and HyperCLOVA X SEED: the defaults
transformers' config classes fill in, the options read, a clear
CheckpointError for what the engine does not support, and the paths the
shared parity tests leave out. Token parity: test_model_parity /
test_engine_parity (variant jais2); test_model_parity / test_engine_parity
(variant hyperclovax), at tensor_parallel_size 2 test_tp_engine (slow), LoRA
test_lora_engine (slow)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.granite import GraniteDecoderLayer
from splitserve.engine.models.hyperclovax import PeriNormDecoderLayer
from splitserve.engine.models.jais2 import Jais2CausalLM
from splitserve.engine.models.layers import LayerNorm
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.fixtures.checkpoints import hf_model, variant_kwargs, write_hf_checkpoint
from tests.unit.test_model_parity import ATOL, PROMPT, hf_logits, prompt_logits


def raw(arch: str, *absent: str, **extra) -> dict:
    """A config.json of ``arch`` without the keys ``absent``."""
    cfg = {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, **extra}
    return {k: v for k, v in cfg.items() if k not in absent}


def refused(cfg: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(cfg)


def test_jais2_defaults():
    # its eps is layer_norm_eps (rms_norm_eps is not read); biases on by default
    cfg = ModelConfig.from_hf(raw("Jais2ForCausalLM", "num_key_value_heads", rms_norm_eps=0.5))
    assert cfg.family == "jais2" and cfg.rms_norm_eps == 1e-5 and cfg.head_dim == 16
    assert cfg.num_kv_heads == 4 and cfg.rope_theta == 10000.0 and cfg.options.rotary_dim is None
    opts = cfg.options
    assert (opts.hidden_act, opts.plain_mlp, opts.layer_norm) == ("relu2", ("up_proj", "down_proj"), True)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.tie_word_embeddings) == (0, (150024,), False)
    cfg = ModelConfig.from_hf(raw("Jais2ForCausalLM", "max_position_embeddings", layer_norm_eps=1e-3,
                                  attention_bias=False, mlp_bias=False))
    assert (cfg.rms_norm_eps, cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (1e-3, False, False, False)
    assert cfg.max_position == 8192
    with pytest.raises(TensorParallelConfigError, match="Jais2ForCausalLM"):
        check(cfg, 2)


def test_jais2_layer_norms_load_and_lora_is_refused(tiny_checkpoints):
    model = load_model(load_checkpoint(tiny_checkpoints["jais2"]), dtype=torch.float32, device="cpu")
    norm = model.layers[0].input_layernorm
    assert isinstance(norm, LayerNorm) and norm.eps == 1e-2
    ref = hf_model(tiny_checkpoints["jais2"]).model.layers[0].input_layernorm
    torch.testing.assert_close(norm.bias, ref.bias)  # the perturbed bias, where transformers has it
    assert isinstance(model, Jais2CausalLM)
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for Jais2ForCausalLM"):
        model.enable_lora(2, 4)


@pytest.mark.parametrize("extra, match", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    ({"hidden_act": "xielu"}, "hidden_act 'xielu' is not supported for jais2"),
])
def test_jais2_unsupported_options_are_refused(extra, match):
    refused(raw("Jais2ForCausalLM", **extra), match)


def test_hyperclovax_defaults():
    cfg = ModelConfig.from_hf(raw("HyperCLOVAXForCausalLM", "num_key_value_heads"))
    opts = cfg.options
    # attention_multiplier absent: head_dim ** -0.5; the other scalars 1; post-norms on
    assert cfg.family == "hyperclovax" and opts.attn_scale is None and opts.sandwich_norms
    assert (opts.embed_scale, opts.residual_scale, opts.logit_scale, opts.logits_divisor) == (1, 1, 1, 1)
    assert (cfg.rms_norm_eps, cfg.bos_token_id, cfg.eos_token_ids, cfg.num_kv_heads) == (1e-6, 1, (2,), 4)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias, cfg.head_dim) == (False, False, False, 16)
    cfg = ModelConfig.from_hf(raw("HyperCLOVAXForCausalLM", attention_multiplier=0.5, logits_scaling=4.0,
                                  embedding_multiplier=2.0, residual_multiplier=0.25, use_post_norm=False,
                                  attention_bias=True, mlp_bias=True))
    opts = cfg.options
    assert (opts.attn_scale, opts.logit_scale, opts.logits_divisor) == (0.5, 4.0, 1.0)
    assert (opts.embed_scale, opts.residual_scale, opts.sandwich_norms) == (2.0, 0.25, False)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)
    check(cfg, 2)  # splits: test_tp_engine checks its tokens at TP=2


def test_hyperclovax_without_post_norms_matches_transformers(tiny_checkpoints, tmp_path):
    # use_post_norm false: Granite's layers, the logits still multiplied
    path = write_hf_checkpoint(tmp_path / "no-post-norm", "HyperCLOVAXConfig",
                               {**variant_kwargs("hyperclovax", tiny_checkpoints.vocab_size),
                                "use_post_norm": False}, 205, {},
                               tiny_checkpoints.tokenizer_dir)
    model = load_model(load_checkpoint(path), dtype=torch.float32, device="cpu")
    assert type(model.layers[0]) is GraniteDecoderLayer
    torch.testing.assert_close(prompt_logits(model), hf_logits(hf_model(path), PROMPT), atol=ATOL, rtol=0)
    with_norms = load_model(load_checkpoint(tiny_checkpoints["hyperclovax"]), dtype=torch.float32,
                            device="cpu")
    assert isinstance(with_norms.layers[0], PeriNormDecoderLayer)


@pytest.mark.parametrize("extra, match", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5 is not supported"),
    ({"logits_scaling": -1.0}, "logits_scaling must be a positive number"),
    ({"hidden_act": "relu2"}, "activation 'relu2' is not supported"),
])
def test_hyperclovax_unsupported_options_are_refused(extra, match):
    refused(raw("HyperCLOVAXForCausalLM", **extra), match)
