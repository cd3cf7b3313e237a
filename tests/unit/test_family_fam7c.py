"""Hy3 (hy_v3) and LongCat-Flash (longcat_flash): the config.json defaults
and derived layer kinds read, what is refused (options, fp8 checkpoints,
tensor parallelism, LoRA), the checkpoints' router names loaded into the
router's slots, LongCat-Flash's sublayers, zero-computation experts and
latent scales, and multi-token-prediction tensors skipped. Token parity is
in test_moe_parity (variants hy_v3, longcat_flash)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import (ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, prompt_logits,
                                          run, step_meta)

HY = "HYV3ForCausalLM"
LONGCAT = "LongcatFlashForCausalLM"


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
    assert model.enable_lora(1, 4)  # adapters on the attention projections, as the other MoE families


def test_longcat_flash_defaults():
    cfg = ModelConfig.from_hf({"architectures": [LONGCAT], "vocab_size": 32, "hidden_size": 64})
    moe, opts, mla = cfg.moe, cfg.options, cfg.options.mla
    assert cfg.num_layers == 56 and not any(moe.sparse_layers)  # 28 layers of two sublayers
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.routed_scaling_factor) \
        == (512, 12, 2048, 6.0)
    assert not moe.renormalize and opts.zero_experts == 256 and cfg.intermediate_size == 12288
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) \
        == (1536, 512, 128, 64, 128)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 1, 576)
    assert opts.interleaved_rope and opts.rotary_dim == 64 and opts.attn_scale == 192 ** -0.5
    assert (cfg.rope_theta, cfg.rms_norm_eps) == (10000000.0, 1e-5) and not cfg.tie_word_embeddings
    # num_hidden_layers counts sublayers; transformers' other key names are read
    cfg = ModelConfig.from_hf({"architectures": [LONGCAT], "vocab_size": 32, "hidden_size": 64,
                               "num_hidden_layers": 6, "num_local_experts": 8, "num_experts_per_tok": 3,
                               "moe_intermediate_size": 16, "intermediate_size": 40, "zero_expert_num": 0})
    assert cfg.num_layers == 6 and (cfg.moe.num_experts, cfg.moe.top_k) == (8, 3)
    assert (cfg.moe.expert_intermediate_size, cfg.intermediate_size, cfg.options.zero_experts) == (16, 40, 0)


@pytest.mark.parametrize("extra, match", [
    ({"router_bias": True}, "router_bias"),
    ({"head_dim": 128}, "head_dim"),
    ({"qk_head_dim": 100}, "qk_head_dim"),
    ({"q_lora_rank": None}, "q_lora_rank"),
    ({"moe_topk": 600}, "moe_topk"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 LongcatFlashForCausalLM"),
])
def test_longcat_flash_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({"architectures": [LONGCAT], "vocab_size": 32, "hidden_size": 64, **extra})


def test_longcat_flash_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="LongCat-Flash"):
        check(ModelConfig.from_hf({"architectures": [LONGCAT], "vocab_size": 32, "hidden_size": 64}), 2)


def test_longcat_flash_sublayers_zero_experts_and_scales(parity_models):
    model, ref = parity_models("longcat_flash")
    assert len(model.layers) == 4 and model._skipped("model.mtp.layers.0.eh_proj.weight")
    assert [layer.shortcut is not None for layer in model.layers] == [True, False, True, False]
    # sublayer 1 of layer 1 is layer 3; its latent scales sqrt(64 / 24) and sqrt(64 / 32)
    attn = model.layers[3].self_attn
    assert torch.equal(attn.q_b_proj.weight, ref.model.layers[1].self_attn[1].q_b_proj.weight)
    assert (attn.q_b_proj.scale, attn.kv_a_layernorm.scale) == ((64 / 24) ** 0.5, 2 ** 0.5)
    # some tokens choose a zero-computation expert (ids 4, 5) in some layer
    chosen = []
    hooks = [layer.shortcut.gate.register_forward_hook(lambda _, __, out: chosen.append(out))
             for layer in model.layers[0::2]]
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    try:
        want = run(model, new_cache(model), PROMPT, positions, meta)
    finally:
        for hook in hooks:
            hook.remove()
    biases = [layer.shortcut.e_score_correction_bias for layer in model.layers[0::2]]
    ids = [torch.topk(out.softmax(-1) + b, 2, dim=-1)[1] for out, b in zip(chosen, biases)]
    assert any((i >= 4).any() for i in ids) and any((i < 4).any() for i in ids)
    # the router's correction bias, loaded from mlp.router.e_score_correction_bias, matters
    bias = biases[0].data.clone()
    try:
        biases[0].data.zero_()
        wrong = run(model, new_cache(model), PROMPT, positions, meta)
    finally:
        biases[0].data.copy_(bias)
    assert (wrong - want).abs().max() > 10 * ATOL
    torch.testing.assert_close(want, hf_logits(ref, PROMPT), atol=ATOL, rtol=0)
    with pytest.raises(CheckpointError, match="LoRA"):
        model.enable_lora(1, 4)


@pytest.mark.parametrize("variant", ["hy_v3", "longcat_flash"])
def test_weight_dtype_fp8_quantizes_at_load(tiny_checkpoints, parity_models, variant):
    # the experts (the shortcut's too) to fp8 once loaded, the routers float32; logits stay near
    model = load_model(load_checkpoint(tiny_checkpoints[variant]), torch.float32, weight_dtype="fp8")
    block = model.layers[0].mlp if variant == "hy_v3" else model.layers[0].shortcut
    assert block.w_down.dtype == torch.float8_e4m3fn and block.gate.weight.dtype == torch.float32
    assert model.layers[1].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    full, _ = parity_models(variant)
    logits, ref = prompt_logits(model), prompt_logits(full)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < 0.35
