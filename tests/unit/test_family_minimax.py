"""config.json parsing and loading of MiniMax-M2 and FlexOlmo: the defaults
transformers' config classes fill in, the options read, MiniMax-M2's router
bias renamed at load, and a clear CheckpointError (or tensor parallel
refusal) for what the engine does not support. Token parity is in
test_moe_parity."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.models.minimax_m2 import MiniMaxM2CausalLM
from splitserve.engine.parallel.plan import TensorParallelConfigError, check


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, **extra}


def test_minimax_m2_defaults_and_options():
    m = ModelConfig.from_hf(raw("MiniMaxM2ForCausalLM"))
    assert m.family == "minimax_m2" and m.rms_norm_eps == 1e-6 and m.rope_theta == 5000000.0
    assert (m.num_kv_heads, m.head_dim, m.options.rotary_dim) == (8, 128, None)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (256, 8, 128)
    moe = m.moe
    assert moe.grouped_sigmoid and moe.renormalize and (moe.num_groups, moe.topk_groups) == (1, 1)
    assert moe.routed_scaling_factor == 1.0 and moe.shared_expert_intermediate_size == 0
    assert m.qk_norm and m.options.full_qk_norm and not m.options.norm_fp32_product
    assert not (m.attention_bias or m.o_proj_bias or m.mlp_bias)
    # the original config's rotary_dim, or transformers' partial_rotary_factor
    m = ModelConfig.from_hf(raw("MiniMaxM2ForCausalLM", head_dim=128, rotary_dim=64, num_local_experts=8,
                                scoring_func="sigmoid", use_qk_norm=True, attn_type_list=[1, 1]))
    assert m.options.rotary_dim == 64 and m.moe.num_experts == 8
    m = ModelConfig.from_hf(raw("MiniMaxM2ForCausalLM", head_dim=16,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                 "partial_rotary_factor": 0.5}))
    assert m.options.rotary_dim == 8 and m.rope_theta == 1e4


def test_flex_olmo_defaults_and_options():
    m = ModelConfig.from_hf(raw("FlexOlmoForCausalLM"))
    assert m.family == "flex_olmo" and m.rms_norm_eps == 1e-6 and m.rope_theta == 500000.0
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (7, 5, 128)
    assert not m.moe.renormalize and not m.moe.grouped_sigmoid and m.moe.sparse_layers == (True, True)
    assert m.qk_norm and m.options.full_qk_norm and m.options.post_norms and m.options.norm_fp32_product
    m = ModelConfig.from_hf(raw("FlexOlmoForCausalLM", num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True, attention_bias=True, head_dim=32))
    assert m.moe.renormalize and m.attention_bias and m.o_proj_bias and not m.mlp_bias
    assert m.head_dim == 32


@pytest.mark.parametrize("arch, extra, match", [
    ("MiniMaxM2ForCausalLM", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for minimax_m2"),
    ("MiniMaxM2ForCausalLM", {"scoring_func": "softmax"}, "scoring_func 'softmax'"),
    ("MiniMaxM2ForCausalLM", {"use_routing_bias": False}, "use_routing_bias"),
    ("MiniMaxM2ForCausalLM", {"use_qk_norm": False}, "use_qk_norm"),
    ("MiniMaxM2ForCausalLM", {"qk_norm_type": "per_head"}, "qk_norm_type 'per_head'"),
    ("MiniMaxM2ForCausalLM", {"shared_intermediate_size": 64}, "shared_intermediate_size"),
    ("MiniMaxM2ForCausalLM", {"attn_type_list": [0, 1]}, "attn_type_list"),
    ("MiniMaxM2ForCausalLM", {"num_local_experts": 1, "num_experts_per_tok": 1}, "num_local_experts"),
    ("MiniMaxM2ForCausalLM", {"head_dim": 16, "rotary_dim": 5}, "rotary_dim"),
    ("MiniMaxM2ForCausalLM", {"quantization_config": {"quant_method": "fp8"}},
     "quantization_config: fp8 MiniMaxM2ForCausalLM"),
    ("FlexOlmoForCausalLM", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for flex_olmo"),
    ("FlexOlmoForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
])
def test_unsupported_options_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


@pytest.mark.parametrize("arch", ["MiniMaxM2ForCausalLM", "FlexOlmoForCausalLM"])
def test_all_head_qk_norms_split_by_heads(arch):
    # test_tp_engine checks MiniMax-M2's tokens at TP 2 (FlexOlmo's norms split as OLMo 2's)
    cfg = ModelConfig.from_hf(raw(arch, num_key_value_heads=2))
    check(cfg, 2)
    check(cfg, 4)  # each KV head, and its slice of k_norm, on two ranks
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(4\) is not a multiple"):
        check(cfg, 3)


def test_minimax_m2_router_bias_is_renamed_and_chooses(tiny_checkpoints):
    from safetensors.torch import load_file

    ck = load_checkpoint(tiny_checkpoints["minimax_m2"])
    assert ck.model_config.options.rotary_dim == 8  # the parity checkpoint rotates half of each head
    tensors = load_file(str(ck.weight_files[0]))
    name = "model.layers.0.block_sparse_moe.e_score_correction_bias"
    assert name in tensors and "model.layers.0.block_sparse_moe.experts.7.w1.weight" in tensors
    model = MiniMaxM2CausalLM(ck.model_config, torch.float32, "cpu")
    model.load_weights(tensors.items())
    torch.testing.assert_close(model.layers[0].mlp.e_score_correction_bias.data, tensors[name])
    # the fixture's bias changes which experts some tokens run
    mlp, x = model.layers[0].mlp, torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with_bias = mlp(x)
    mlp.e_score_correction_bias.data.zero_()
    assert not torch.allclose(with_bias, mlp(x))
