"""Cohere 2 MoE (cohere2_moe) and K-EXAONE (exaone_moe): Cohere 2 MoE's
router against transformers' own, the config.json defaults and derived
layer kinds read, what is refused (options, fp8 checkpoints, tensor
parallelism, LoRA), Cohere 2 MoE's RMSNorm form against transformers,
K-EXAONE's multi-token-prediction tensors skipped and its correction bias
loaded from the checkpoint's name. Token parity is in test_moe_parity
(variants cohere2_moe, exaone_moe), bf16 in test_bf16_parity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.cohere2_moe import Cohere2MoeBlock, route_topk
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.fixtures.checkpoints import hf_model
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta

COHERE = "Cohere2MoeForCausalLM"
EXAONE = "ExaoneMoeForCausalLM"


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, **extra}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selection, norm", [("softmax", True), ("sigmoid", True), ("sigmoid", False)])
def test_cohere2_moe_router_matches_transformers(selection, norm, dtype):
    from transformers import Cohere2MoeConfig
    from transformers.models.cohere2_moe.modeling_cohere2_moe import Cohere2MoeTopKRouter

    router = Cohere2MoeTopKRouter(Cohere2MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=3,
                                                   expert_selection_fn=selection, norm_topk_prob=norm))
    gen = torch.Generator().manual_seed(208)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=gen) * 0.3)
    router = router.to(dtype)
    x = torch.randn(64, 32, generator=gen).to(dtype)
    _, want_w, want_ids = router(x)
    w, ids = route_topk(F.linear(x, router.weight), 3, selection == "sigmoid", norm)
    assert torch.equal(ids, want_ids)
    assert w.dtype == torch.float32 and torch.equal(w, want_w.float())


def test_cohere2_moe_defaults():
    cfg = ModelConfig.from_hf(raw(COHERE))
    moe, opts = cfg.moe, cfg.options
    assert (cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps) == (128, 10000.0, 1e-5)
    assert cfg.tie_word_embeddings
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (8, 2, 128, 0)
    assert moe.sparse_layers == (True,) * 6 and moe.renormalize and not moe.topk_sigmoid
    assert moe.shared_expert_average and cfg.intermediate_size == 128
    # every fourth layer full attention, without RoPE; the others slide over 4096 tokens
    assert cfg.layer_windows == (4096, 4096, 4096, 0, 4096, 4096) and opts.nope_layers == (3,)
    assert opts.float_layer_norm == "cohere" and opts.parallel_residual and opts.interleaved_rope
    assert opts.logit_scale == 0.0625 and not cfg.attention_bias


def test_cohere2_moe_dense_prefix_and_rms_norm():
    # two dense layers of 96 (full attention every layer: they rotate, force_rope), then
    # the sparse layers' own pattern; RMSNorm with rms_norm_eps; summed shared experts
    cfg = ModelConfig.from_hf(raw(COHERE, first_k_dense_replace=2, sliding_window_pattern=2, sliding_window=8,
                                  prefix_dense_intermediate_size=96, num_shared_experts=2,
                                  shared_expert_combination_strategy="sum", expert_selection_fn="sigmoid",
                                  norm_topk_prob=False, rms_norm_eps=1e-3, head_dim=32))
    moe = cfg.moe
    assert moe.sparse_layers == (False, False, True, True, True, True) and cfg.intermediate_size == 96
    assert moe.expert_intermediate_size == 128 and moe.shared_expert_intermediate_size == 256
    assert moe.topk_sigmoid and not moe.renormalize and not moe.shared_expert_average
    assert cfg.layer_windows == (0, 0, 8, 0, 8, 0) and cfg.options.nope_layers == (3, 5)
    assert (cfg.options.float_layer_norm, cfg.rms_norm_eps, cfg.head_dim) == ("", 1e-3, 32)
    # another prefix pattern: the dense layers' full attention goes without RoPE too
    cfg = ModelConfig.from_hf(raw(COHERE, mlp_layer_types=["dense"] * 2 + ["sparse"] * 4,
                                  layer_types=["full_attention"] * 6, prefix_dense_sliding_window_pattern=2))
    assert cfg.options.nope_layers == tuple(range(6))


@pytest.mark.parametrize("extra, match", [
    ({"expert_selection_fn": "topk"}, "expert_selection_fn"),
    ({"shared_expert_combination_strategy": "max"}, "shared_expert_combination_strategy"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "nested by layer type"),
    ({"sliding_window": None}, "sliding_window is null"),
    ({"sliding_window_pattern": 0}, "sliding_window_pattern"),
    ({"mlp_layer_types": ["dense", "moe"] * 3}, "mlp_layer_types"),
    ({"layer_types": ["chunked_attention"] * 6}, "layer_types"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 Cohere2MoeForCausalLM"),
])
def test_cohere2_moe_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(COHERE, **extra))


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


@pytest.mark.parametrize("arch, name", [(COHERE, "Cohere 2 MoE"), (EXAONE, "K-EXAONE")])
def test_tensor_parallel_is_refused(arch, name):
    with pytest.raises(TensorParallelConfigError, match=name):
        check(ModelConfig.from_hf(raw(arch)), 2)


def test_cohere2_moe_variant_layers(parity_models):
    model, _ = parity_models("cohere2_moe")
    assert model.cfg.options.nope_layers == (2,)  # layer 0 (dense, full) rotates: force_rope
    dense = model.layers[0].mlp
    assert not isinstance(dense, Cohere2MoeBlock) and dense.down_proj.in_features == 96
    assert all(isinstance(layer.mlp, Cohere2MoeBlock) for layer in model.layers[1:])
    # LoRA on its attention (and dense first MLP), not its experts (test_lora_engine)
    assert {name for _, name in model.enable_lora(1, 4)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_cohere2_moe_rms_norm_matches_transformers(tiny_checkpoints, tmp_path):
    # the variant's weights read as RMSNorm weights (rms_norm_eps set) on both sides
    path = tmp_path / "cohere2_moe_rms"
    shutil.copytree(tiny_checkpoints["cohere2_moe"], path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-2}))
    model, ref = load_model(load_checkpoint(path), torch.float32), hf_model(path)
    assert model.cfg.options.float_layer_norm == ""
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    torch.testing.assert_close(run(model, new_cache(model), PROMPT, positions, meta), hf_logits(ref, PROMPT),
                               atol=ATOL, rtol=0)


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
