"""K-EXAONE (exaone_moe): the config.json defaults and derived layer kinds
read, what is refused (options, fp8 checkpoints, tensor parallelism), its
multi-token-prediction tensors skipped and its correction bias loaded from
the checkpoint's name. Token parity is in test_moe_parity (variant
exaone_moe), bf16 in test_bf16_parity."""

from __future__ import annotations

import pytest

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta

EXAONE = "ExaoneMoeForCausalLM"


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, **extra}


def test_exaone_moe_defaults():
    cfg = ModelConfig.from_hf(raw(EXAONE, num_hidden_layers=4))
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (64, 8, 1024, 1024)
    assert moe.grouped_sigmoid and moe.renormalize and moe.routed_scaling_factor == 2.5
    assert (moe.num_groups, moe.topk_groups) == (1, 1) and moe.sparse_layers == (False, True, True, True)
    assert cfg.qk_norm and not (cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rms_norm_eps) == (16, 32, 1e-5)
    assert not cfg.tie_word_embeddings
    assert cfg.layer_windows == (4096, 4096, 4096, 0) and cfg.options.nope_layers == (3,)
    assert not cfg.options.post_norms
    # mlp_layer_types over first_k_dense_replace; no window: every layer full and rotating
    cfg = ModelConfig.from_hf(raw(EXAONE, num_hidden_layers=2, mlp_layer_types=["sparse", "dense"],
                                  first_k_dense_replace=2, sliding_window=None,
                                  layer_types=["full_attention"] * 2, num_shared_experts=0))
    assert cfg.moe.sparse_layers == (True, False) and cfg.moe.shared_expert_intermediate_size == 0
    assert cfg.layer_windows == (0, 0) and cfg.options.nope_layers == ()


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_experts": 6, "n_group": 4}, "n_group"),
    ({"sliding_window_pattern": "LLLG"}, "needs layer_types"),
    ({"sliding_window": None}, "needs layer_types"),
    ({"mlp_layer_types": ["dense"] * 5}, "mlp_layer_types has 5 entries"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 ExaoneMoeForCausalLM"),
])
def test_exaone_moe_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(EXAONE, **extra))


@pytest.mark.parametrize("arch, name", [(EXAONE, "K-EXAONE")])
def test_tensor_parallel_is_refused(arch, name):
    with pytest.raises(TensorParallelConfigError, match=name):
        check(ModelConfig.from_hf(raw(arch)), 2)


def test_exaone_moe_bias_name_mtp_skipped_and_bias_binds(parity_models):
    model, ref = parity_models("exaone_moe")
    assert model._skipped("mtp.layers.0.mlp.gate.weight")
    block = model.layers[1].mlp
    assert block.shared_expert is not None and block.shared_expert_gate is None
    assert model.cfg.options.nope_layers == (1,)
    # the checkpoint's mlp.e_score_correction_bias loaded into the router's slot
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    bias = block.e_score_correction_bias.data.clone()
    assert bias.abs().max() > 0
    try:
        block.e_score_correction_bias.data.zero_()
        wrong = run(model, new_cache(model), PROMPT, positions, meta)
    finally:
        block.e_score_correction_bias.data.copy_(bias)
    assert (wrong - hf_logits(ref, PROMPT)).abs().max() > 10 * ATOL
    assert model.enable_lora(1, 4)  # adapters on the attention projections, as the other MoE families
