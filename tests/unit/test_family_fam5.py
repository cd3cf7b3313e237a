"""config.json parsing and refusals of the InternLM3 family: the defaults
transformers' config class fills in (checked against it), its bias keys,
and a clear CheckpointError for what the engine does not support. Token
parity is in test_model_parity / test_engine_parity (internlm3); at
tensor_parallel_size 2 in test_tp_engine (slow)."""

from __future__ import annotations

import pytest

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, **extra}


def hf_config(cls_name: str, cfg: dict):
    import transformers

    return getattr(transformers, cls_name)(**{k: v for k, v in cfg.items() if k != "architectures"})


def refused(cfg: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(cfg)


# --- InternLM3 ----------------------------------------------------------------

def test_internlm3_defaults_as_its_config_class():
    cfg = raw("InternLM3ForCausalLM")
    ours, ref = ModelConfig.from_hf(cfg), hf_config("InternLM3Config", cfg)
    assert ours.family == "internlm3" and ours.head_dim == ref.head_dim == 128
    assert ours.num_kv_heads == ref.num_key_value_heads == 2
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.max_position == ref.max_position_embeddings
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,)) and not ours.tie_word_embeddings
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (False, False, False)
    nulls = ModelConfig.from_hf(raw("InternLM3ForCausalLM", head_dim=None, num_key_value_heads=None))
    assert (nulls.head_dim, nulls.num_kv_heads) == (16, 4)


@pytest.mark.parametrize("keys", [{"qkv_bias": True, "bias": True},
                                  {"attention_bias": True, "mlp_bias": True}])
def test_internlm3_biases_by_either_name(keys):
    cfg = ModelConfig.from_hf(raw("InternLM3ForCausalLM", **keys))
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)


def test_internlm3_refuses_qkv_bias_apart_from_bias():
    refused(raw("InternLM3ForCausalLM", qkv_bias=True, bias=False), "qkv_bias .* different from bias")
