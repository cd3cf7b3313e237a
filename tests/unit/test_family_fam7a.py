"""config.json parsing and refusals of the nanochat family: the defaults
transformers' config class fills in (checked against that class), fp8 weights quantized at load, and a clear CheckpointError
(or tensor-parallel / LoRA refusal) for what the engine does not support.
Token parity is in test_model_parity / test_engine_parity (nanochat)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import prompt_logits

LOGIT_REL_BOUND = 0.1  # fp8 weights: close to the full-precision logits, not equal


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, **extra}


def hf_config(cls_name: str, cfg: dict):
    import transformers

    return getattr(transformers, cls_name)(**{k: v for k, v in cfg.items() if k != "architectures"})


def refused(cfg: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=f"config.json: .*{match}"):
        ModelConfig.from_hf(cfg)


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


def test_nanochat_refuses_lora_and_tensor_parallel(parity_models):
    model, _ = parity_models("nanochat")
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for nanochat"):
        model.enable_lora(1, 4)
    with pytest.raises(TensorParallelConfigError, match="weightless norms and flipped q/k rows"):
        check(model.cfg, 2)


def test_nanochat_weight_dtype_fp8_quantizes_at_load(tiny_checkpoints, parity_models):
    model = load_model(load_checkpoint(tiny_checkpoints["nanochat"]), torch.float32, weight_dtype="fp8")
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    full, _ = parity_models("nanochat")
    logits, ref = prompt_logits(model), prompt_logits(full)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < LOGIT_REL_BOUND
