"""config.json parsing of Jais 2: the defaults transformers' config classes
fill in, the options read, a clear CheckpointError for what the engine does
not support, and the paths the shared parity tests leave out. Token parity:
test_model_parity / test_engine_parity (variant jais2)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.jais2 import Jais2CausalLM
from splitserve.engine.models.layers import LayerNorm
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.fixtures.checkpoints import hf_model


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
