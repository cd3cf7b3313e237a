"""ERNIE 4.5 MoE (ernie4_5_moe) and HunYuan MoE V1 (hunyuan_v1_moe): their
routers against transformers' own, the config.json defaults and sparse
layers read, what is refused (options, fp8 checkpoints, LoRA, tensor
parallelism), ERNIE's multi-token-prediction tensors skipped, and that its
variant's correction bias moves the logits. Token parity is in
test_moe_parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.ernie4_5_moe import Ernie4_5MoeBlock, route_corrected_softmax
from splitserve.engine.models.hunyuan_moe import HunYuanMoeBlock
from splitserve.engine.models.moe import route
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta

ARCH = "Ernie4_5_MoeForCausalLM"


def raw(**extra) -> dict:
    return {"architectures": [ARCH], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "moe_num_experts": 8, "moe_k": 2,
            "moe_intermediate_size": 32, **extra}


@pytest.mark.parametrize("top_k, norm_min", [(2, 1e-12), (5, 0.9)])
def test_router_matches_transformers(top_k, norm_min):
    from transformers import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    router = Ernie4_5_MoeTopKRouter(Ernie4_5_MoeConfig(hidden_size=32, moe_num_experts=16, moe_k=top_k,
                                                       moe_norm_min=norm_min))
    gen = torch.Generator().manual_seed(170)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=gen) * 0.3)
        router.moe_statics.e_score_correction_bias.copy_(torch.randn(1, 16, generator=gen) * 0.1)
    x = torch.randn(64, 32, generator=gen)
    _, want_w, want_ids = router(x)
    w, ids = route_corrected_softmax(F.linear(x, router.weight), router.moe_statics.e_score_correction_bias[0],
                                     top_k, norm_min)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=0)


def test_defaults_and_sparse_layers():
    cfg = ModelConfig.from_hf(raw())
    moe = cfg.moe
    # moe_layer_start_index 1, end -1 (the last layer), interval 1; two shared experts
    assert moe.sparse_layers == (False, True, True, True)
    assert (moe.num_experts, moe.top_k, moe.shared_expert_intermediate_size) == (8, 2, 64)
    assert moe.corrected_softmax_norm_min == 1e-12
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings, cfg.rope_theta) == (4, 16, True, 500000.0)
    assert not (cfg.attention_bias or cfg.mlp_bias or cfg.options.lm_head_bias)
    biased = ModelConfig.from_hf(raw(use_bias=True, moe_layer_interval=2, moe_layer_start_index=0,
                                     moe_layer_end_index=2, moe_num_shared_experts=0))
    assert biased.moe.sparse_layers == (False, True, False, False)
    assert biased.moe.shared_expert_intermediate_size == 0
    assert biased.attention_bias and biased.o_proj_bias and biased.mlp_bias and biased.options.lm_head_bias


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"moe_layer_interval": 0}, "moe_layer_interval"),
    ({"moe_num_experts": [8, 8]}, "moe_num_experts"),
    ({"moe_k": 9}, "num_experts_per_tok"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(**extra))


def test_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="ERNIE 4.5 MoE"):
        check(ModelConfig.from_hf(raw()), 2)


def test_mtp_skipped_and_correction_bias_binds(parity_models):
    model, ref = parity_models("ernie4_5_moe")  # (LoRA on its attention: test_lora_engine)
    assert model._skipped("model.mtp_block.0.mlp.gate.weight")
    assert not isinstance(model.layers[0].mlp, Ernie4_5MoeBlock)  # moe_layer_start_index 1
    block = model.layers[1].mlp
    assert block.shared_expert is not None and block.shared_expert_gate is None
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    bias = block.correction_bias.data.clone()
    try:
        block.correction_bias.data.zero_()
        wrong = run(model, new_cache(model), PROMPT, positions, meta)
    finally:
        block.correction_bias.data.copy_(bias)
    assert (wrong - hf_logits(ref, PROMPT)).abs().max() > 10 * ATOL


# --- HunYuan MoE --------------------------------------------------------------

HUNYUAN = "HunYuanMoEV1ForCausalLM"


def hunyuan(**extra) -> dict:
    return {"architectures": [HUNYUAN], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16, "num_experts": 8,
            "moe_topk": 2, **extra}


def test_hunyuan_router_matches_transformers():
    from transformers import HunYuanMoEV1Config
    from transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe import HunYuanMoEV1Gate

    gate = HunYuanMoEV1Gate(HunYuanMoEV1Config(hidden_size=32, num_experts=16, moe_topk=3))
    gen = torch.Generator().manual_seed(171)
    with torch.no_grad():
        gate.wg.weight.copy_(torch.randn(16, 32, generator=gen) * 0.3)
    x = torch.randn(64, 32, generator=gen)
    _, want_w, want_ids = gate(x)
    w, ids = route(F.linear(x, gate.wg.weight), 3, renormalize=True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=0)


def test_hunyuan_defaults_and_uniform_lists():
    cfg = ModelConfig.from_hf(hunyuan(moe_topk=[3, 3], num_experts=[8, 8]))
    moe = cfg.moe
    assert moe.sparse_layers == (True, True) and moe.renormalize
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (8, 3, 32, 32)
    assert (cfg.num_kv_heads, cfg.tie_word_embeddings, cfg.options.qk_norm_after_rope) == (4, False, True)
    assert not (cfg.attention_bias or cfg.mlp_bias)


@pytest.mark.parametrize("extra, match", [
    ({"moe_topk": [2, 3]}, "moe_topk"),
    ({"num_experts": [8]}, "num_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": None}, "head_dim"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_hunyuan_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(hunyuan(**extra))


def test_hunyuan_lora_and_tensor_parallel_refused(parity_models):
    with pytest.raises(TensorParallelConfigError, match="HunYuan MoE"):
        check(ModelConfig.from_hf(hunyuan()), 2)
    model, _ = parity_models("hunyuan_moe")
    assert all(isinstance(layer.mlp, HunYuanMoeBlock) for layer in model.layers)
    assert model.layers[0].mlp.gate.weight.dtype == torch.float32
    with pytest.raises(CheckpointError, match="LoRA"):
        model.enable_lora(1, 4)
