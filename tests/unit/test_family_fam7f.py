"""Flint, Sarvam MoE, Sarvam MLA and Param2 MoE: the config.json defaults
and original key names read, derived layer kinds, what is refused (options,
fp8 checkpoints, tensor parallelism, LoRA). Token parity is in
test_moe_parity (variants flint, sarvam_moe, sarvam_mla, param2moe)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.flint import route_sigmoid
from splitserve.engine.parallel.plan import TensorParallelConfigError, check

FLINT = "FlintForCausalLM"
SARVAM = "SarvamMoEForCausalLM"
PARAM2 = "Param2MoEForCausalLM"
SARVAM_MLA = "SarvamMLAForCausalLM"


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, **extra}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flint_router_matches_transformers(dtype):
    from transformers import FlintConfig
    from transformers.models.flint.modeling_flint import FlintTopKRouter

    router = FlintTopKRouter(FlintConfig(hidden_size=32, num_experts=16, num_experts_per_tok=3))
    gen = torch.Generator().manual_seed(235)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=gen) * 0.3)
    x = torch.randn(64, 32, generator=gen).to(dtype)
    _, want_w, want_ids = router(x)
    w, ids = route_sigmoid(F.linear(x.float(), router.weight), 3, renormalize=True)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)


def test_flint_defaults():
    cfg = ModelConfig.from_hf(raw(FLINT))
    moe, opts = cfg.moe, cfg.options
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (256, 6, 512, 1024)
    assert moe.renormalize and not (moe.grouped_sigmoid or moe.topk_sigmoid)
    assert moe.sparse_layers == (False, False, True, True, True, True)
    # full attention (no RoPE) on layers 0, 1, 5 (every fourth from 1) and the last
    assert cfg.layer_windows == (0, 0, 513, 513, 513, 0) and opts.nope_layers == (0, 1, 5)
    assert opts.attention_sinks and opts.norm_fp32_product and cfg.qk_norm
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rms_norm_eps) == (128, 4, 1e-6)
    cfg = ModelConfig.from_hf(raw(FLINT, mlp_only_layers=[], decoder_sparse_step=2, attention_bias=True))
    assert cfg.moe.sparse_layers == (False, True) * 3 and cfg.attention_bias and cfg.o_proj_bias


def test_sarvam_and_param2_defaults_and_original_names():
    cfg = ModelConfig.from_hf(raw(SARVAM))
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (128, 6, 1024, 1024)
    assert moe.grouped_sigmoid and moe.renormalize and moe.routed_scaling_factor == 2.5
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta, cfg.rms_norm_eps) == (64, 4, 8e6, 1e-6)
    assert cfg.qk_norm and cfg.options.rotary_dim is None and not cfg.tie_word_embeddings
    cfg = ModelConfig.from_hf(raw(SARVAM, num_experts=16, num_shared_experts=2, use_qkv_bias=True,
                                  moe_intermediate_size=32, partial_rotary_factor=0.5, head_dim=16))
    assert (cfg.moe.num_experts, cfg.moe.shared_expert_intermediate_size) == (16, 64)
    assert cfg.attention_bias and not cfg.o_proj_bias and cfg.options.rotary_dim == 8
    cfg = ModelConfig.from_hf(raw(PARAM2))
    assert (cfg.moe.num_experts, cfg.moe.shared_expert_intermediate_size) == (64, 4096)
    assert (cfg.num_kv_heads, cfg.rope_theta) == (8, 500000.0) and cfg.tie_word_embeddings


def test_model_type_picks_the_family():
    # transformers saves Sarvam MoE / Param2 MoE under the class it runs them with
    glm = {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    cfg = ModelConfig.from_hf(raw("Glm4MoeForCausalLM", model_type="param2moe", **glm))
    assert cfg.family == "param2moe" and cfg.tie_word_embeddings
    assert ModelConfig.from_hf(raw("Glm4MoeForCausalLM", model_type="glm4_moe", **glm)).family == "glm4_moe"


def test_sarvam_mla_original_config():
    cfg = ModelConfig.from_hf(raw(SARVAM_MLA, num_experts=8, num_shared_experts=1, num_experts_per_tok=2,
                                  moe_intermediate_size=32, kv_lora_rank=32, qk_nope_head_dim=16,
                                  qk_rope_head_dim=8, v_head_dim=16, q_head_dim=24, head_dim=40,
                                  rope_scaling={"type": "deepseek_yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 16,
                                                "mscale_all_dim": 1.0}))
    moe, mla = cfg.moe, cfg.options.mla
    assert (moe.num_experts, moe.num_groups, moe.topk_groups) == (8, 1, 1)
    assert moe.sparse_layers == (False,) + (True,) * 5 and cfg.options.mtp_layers == 0
    assert mla.q_lora_rank == 0 and mla.qk_rope_head_dim == 8 and cfg.options.interleaved_rope
    assert cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "yarn"


@pytest.mark.parametrize("arch, extra, match", [
    (FLINT, {"hidden_act": "gelu"}, "hidden_act"),
    (FLINT, {"layer_types": ["full_attention"] * 5}, "layer_types"),
    (FLINT, {"sliding_window": None}, "sliding_window"),
    (FLINT, {"quantization_config": {"quant_method": "fp8"}}, f"fp8 {FLINT}"),
    (SARVAM, {"hidden_act": "gelu"}, "hidden_act"),
    (SARVAM, {"quantization_config": {"quant_method": "fp8"}}, f"fp8 {SARVAM}"),
    (PARAM2, {"quantization_config": {"quant_method": "fp8"}}, f"fp8 {PARAM2}"),
    (PARAM2, {"num_experts": 6, "n_group": 4}, "n_group"),
    (SARVAM_MLA, {"num_key_value_heads": 2}, "num_key_value_heads"),
])
def test_refusals(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


def test_flint_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="Flint"):
        check(ModelConfig.from_hf(raw(FLINT)), 2)


def test_sarvam_moe_lora_refused(parity_models):
    model, _ = parity_models("sarvam_moe")
    with pytest.raises(CheckpointError, match="LoRA"):
        model.enable_lora(1, 4)
