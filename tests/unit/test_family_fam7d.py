"""A.X K1 (axk1): the config.json defaults and derived layer kinds read,
what is refused (options, fp8 checkpoints, tensor parallelism, LoRA), both
namings of the norm on the experts' output loaded alike (and a dense layer's
unused one skipped), and that norm shown to bind. Token parity is in
test_moe_parity (variant axk1)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.axk1 import NormedMoeBlock
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta

KOLIBRI, MINICPM, AXK1 = "Kolibri1ForCausalLM", "MiniCPM5MoeForCausalLM", "AXK1ForCausalLM"


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 6,
            "num_attention_heads": 4, **extra}


def logits_of(model) -> torch.Tensor:
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    return run(model, new_cache(model), PROMPT, positions, meta)


def binds(model, ref, param: torch.Tensor) -> None:
    """Zeroing ``param`` moves the logits far from transformers'; restored after."""
    saved = param.data.clone()
    assert saved.abs().max() > 0
    try:
        param.data.zero_()
        wrong = logits_of(model)
    finally:
        param.data.copy_(saved)
    assert (wrong - hf_logits(ref, PROMPT)).abs().max() > 10 * ATOL


def reloaded(model_path, rename) -> torch.nn.Module:
    """The checkpoint's model with its tensors loaded under ``rename(name)``."""
    model = load_model(load_checkpoint(model_path), torch.float32)
    model.load_weights((rename(n), t) for n, t in load_file(str(model_path / "model.safetensors")).items())
    return model


def test_axk1_defaults():
    cfg = ModelConfig.from_hf(raw(AXK1, num_hidden_layers=4, head_dim=99))
    moe, mla = cfg.moe, cfg.options.mla
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (192, 8, 2048, 2048)
    assert moe.grouped_sigmoid and moe.renormalize and moe.routed_scaling_factor == 2.5
    assert (moe.num_groups, moe.topk_groups) == (8, 4) and moe.sparse_layers == (False, True, True, True)
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) \
        == (1536, 512, 128, 64, 128)
    assert cfg.head_dim == 192 and cfg.options.interleaved_rope and cfg.options.rotary_dim == 64
    assert (cfg.rms_norm_eps, cfg.max_position, cfg.eos_token_ids) == (1e-6, 32768, (163691,))
    # first_k_dense_replace / moe_layer_freq derive the layer types, as AXK1Config does
    cfg = ModelConfig.from_hf(raw(AXK1, num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2,
                                  rope_interleave=False))
    assert cfg.moe.sparse_layers == (False, False, True, False, True, False)
    assert not cfg.options.interleaved_rope


@pytest.mark.parametrize("extra, match", [
    ({"q_lora_rank": None}, "q_lora_rank null"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"moe_layer_freq": 0}, "moe_layer_freq"),
    ({"mlp_layer_types": ["dense"] * 5}, "mlp_layer_types"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 AXK1ForCausalLM"),
])
def test_axk1_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(AXK1, **extra))


@pytest.mark.parametrize("arch, name", [(AXK1, "A.X K1")])
def test_tensor_parallel_is_refused(arch, name):
    with pytest.raises(TensorParallelConfigError, match=name):
        check(ModelConfig.from_hf(raw(arch)), 2)


def test_axk1_norm_binds_names_and_dense_norm_skipped(tiny_checkpoints, parity_models):
    model, ref = parity_models("axk1")
    block = model.layers[1].mlp
    assert isinstance(block, NormedMoeBlock) and not isinstance(model.layers[0].mlp, NormedMoeBlock)
    binds(model, ref, block.post_mlp_layernorm.weight)
    with pytest.raises(CheckpointError, match="LoRA"):
        model.enable_lora(1, 4)
    # transformers' module name for the norm, and a dense layer's unused norm beside it
    path = tiny_checkpoints["axk1"]
    moved = load_model(load_checkpoint(path), torch.float32)
    tensors = load_file(str(path / "model.safetensors"))
    moved.load_weights([(n.replace(".post_mlp_layernorm.", ".mlp.post_mlp_layernorm."), t)
                        for n, t in tensors.items()]
                       + [("model.layers.0.post_mlp_layernorm.weight", torch.ones(64))])
    torch.testing.assert_close(logits_of(moved), logits_of(model), atol=0, rtol=0)
