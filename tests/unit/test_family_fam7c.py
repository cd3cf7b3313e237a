"""Hy3 (hy_v3): the config.json defaults and derived layer kinds read,
what is refused (options, fp8 checkpoints, tensor parallelism), the
checkpoint's router names loaded into the router's slots and its
multi-token-prediction layer skipped. Token
parity is in test_moe_parity (variant hy_v3)."""

from __future__ import annotations

import pytest

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta

HY = "HYV3ForCausalLM"


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 4, **extra}


def test_hy_v3_defaults():
    cfg = ModelConfig.from_hf(raw(HY))
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (192, 8, 1536, 1536)
    assert moe.grouped_sigmoid and moe.renormalize and moe.routed_scaling_factor == 2.826
    assert (moe.num_groups, moe.topk_groups) == (1, 1) and moe.sparse_layers == (False, True, True, True)
    assert cfg.qk_norm and not (cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (64, 8, 128, 13312)
    assert (cfg.rope_theta, cfg.rms_norm_eps) == (11158840.0, 1e-5) and not cfg.tie_word_embeddings
    assert cfg.options.mtp_layers == 1 and cfg.options.rotary_dim is None
    # mlp_layer_types alone marks the dense layers (first_k_dense_replace is not HYV3Config's);
    # attention_bias covers o_proj too; router_scaling_factor and the shared experts as written
    cfg = ModelConfig.from_hf(raw(HY, mlp_layer_types=["sparse", "dense", "sparse", "dense"],
                                  first_k_dense_replace=3, attention_bias=True, num_local_experts=16,
                                  num_shared_experts=2, moe_intermediate_size=24, router_scaling_factor=1.5,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0}))
    moe = cfg.moe
    assert moe.sparse_layers == (True, False, True, False) and moe.num_experts == 16
    assert moe.shared_expert_intermediate_size == 48 and moe.routed_scaling_factor == 1.5
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.rope_theta == 1000.0


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"num_experts": 1}, "num_experts must be at least 2"),
    ({"mlp_layer_types": ["dense"] * 3}, "mlp_layer_types has 3 entries"),
    ({"mlp_layer_types": ["dense", "moe", "sparse", "sparse"]}, "mlp_layer_types"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 HYV3ForCausalLM"),
])
def test_hy_v3_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(HY, **extra))


def test_hy_v3_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="Hy3"):
        check(ModelConfig.from_hf(raw(HY)), 2)


def test_hy_v3_router_names_bind_and_mtp_layer_skipped(parity_models):
    model, ref = parity_models("hy_v3")
    assert model._skipped("model.layers.2.mlp.router.gate.weight")  # the layer after the last: MTP
    assert not model._skipped("model.layers.1.mlp.down_proj.weight")
    block = model.layers[0].mlp
    assert block.shared_expert is not None and block.shared_expert_gate is None
    assert block.shared_expert.down_proj.in_features == 64  # two shared experts of 32
    assert not hasattr(model.layers[1].mlp, "e_score_correction_bias")  # layer 1 dense
    # the checkpoint's mlp.expert_bias loaded into the router's slot, and it matters
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    bias = block.e_score_correction_bias.data.clone()
    assert bias.abs().max() > 0
    try:
        block.e_score_correction_bias.data.zero_()
        wrong = run(model, new_cache(model), PROMPT, positions, meta)
    finally:
        block.e_score_correction_bias.data.copy_(bias)
    assert (wrong - hf_logits(ref, PROMPT)).abs().max() > 10 * ATOL
