"""Kolibri (kolibri1), MiniCPM5-MoE (minicpm5_moe) and A.X K1 (axk1): Kolibri's
router against transformers' own, the config.json defaults and derived layer
kinds read, what is refused (options, fp8 checkpoints, tensor parallelism,
LoRA), both checkpoint namings of each family loaded alike, and the
family-specific tensors (Kolibri's correction bias, MiniCPM5's attention
gate, A.X K1's norm on the experts' output) shown to bind. Token parity is in
test_moe_parity (variants kolibri1, minicpm5_moe, axk1)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.axk1 import NormedMoeBlock
from splitserve.engine.models.kolibri1 import Kolibri1MoeBlock, route_biased_logits
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


@pytest.mark.parametrize("norm", [True, False])
def test_kolibri1_router_matches_transformers(norm):
    from transformers import Kolibri1Config
    from transformers.models.kolibri1.modeling_kolibri1 import Kolibri1TopKRouter

    router = Kolibri1TopKRouter(Kolibri1Config(hidden_size=32, num_experts=16, num_experts_per_tok=3,
                                               norm_topk_prob=norm))
    gen = torch.Generator().manual_seed(227)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=gen) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(16, generator=gen))
    x = torch.randn(64, 32, generator=gen)
    logits, want_w, want_ids = router(x)
    w, ids = route_biased_logits(logits, router.e_score_correction_bias, 3, norm)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)


def test_kolibri1_defaults():
    cfg = ModelConfig.from_hf(raw(KOLIBRI, num_hidden_layers=10, num_local_experts=16))
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (16, 6, 512, 512)
    assert moe.sparse_layers == (True,) * 10 and not moe.renormalize and not moe.grouped_sigmoid
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rms_norm_eps, cfg.rope_theta) == (128, 4, 1e-6, 10000.0)
    assert cfg.qk_norm and not (cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias)
    assert not cfg.tie_word_embeddings and cfg.max_position == 262144
    # every fifth layer full attention without RoPE, the rest sliding over 513 tokens
    assert cfg.layer_windows == (513,) * 4 + (0,) + (513,) * 4 + (0,) and cfg.options.nope_layers == (4, 9)
    # no window: every layer full and rotating
    cfg = ModelConfig.from_hf(raw(KOLIBRI, num_hidden_layers=2, sliding_window=None, num_experts=8,
                                  layer_types=["full_attention"] * 2, norm_topk_prob=True))
    assert cfg.layer_windows == (0, 0) and cfg.options.nope_layers == () and cfg.moe.renormalize


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": None}, "sliding_window is null"),
    ({"sliding_window": 0}, "sliding_window must be positive"),
    ({"layer_types": ["chunked_attention"] * 6}, "layer_types"),
    ({"layer_types": ["full_attention"] * 5}, "layer_types has 5 entries"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 Kolibri1ForCausalLM"),
])
def test_kolibri1_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(KOLIBRI, **extra))


def test_minicpm5_moe_defaults():
    cfg = ModelConfig.from_hf(raw(MINICPM, num_hidden_layers=4))
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (160, 16, 512, 512)
    assert moe.grouped_sigmoid and moe.renormalize and moe.routed_scaling_factor == 3.66
    assert (moe.num_groups, moe.topk_groups) == (1, 1) and moe.sparse_layers == (False, True, True, True)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rms_norm_eps, cfg.rope_theta) == (128, 2, 1e-6, 5e6)
    assert (cfg.intermediate_size, cfg.max_position, cfg.eos_token_ids) == (8192, 524288, (1, 130073))
    assert not (cfg.qk_norm or cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias or cfg.tie_word_embeddings)
    assert cfg.layer_windows == (0,) * 4 and cfg.options.nope_layers == ()
    # the older architecture name; first_k_dense_replace without mlp_layer_types; biases on q/k/v/o
    cfg = ModelConfig.from_hf(raw("MiniCPM5MoEForCausalLM", num_hidden_layers=4, first_k_dense_replace=2,
                                  attention_bias=True, n_shared_experts=2, head_dim=None))
    assert cfg.moe.sparse_layers == (False, False, True, True) and cfg.attention_bias and cfg.o_proj_bias
    assert cfg.moe.shared_expert_intermediate_size == 1024 and cfg.head_dim == 16


@pytest.mark.parametrize("extra, match", [
    ({"use_gated_attention": False}, "use_gated_attention"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"n_routed_experts": 6, "n_group": 4}, "n_group"),
    ({"mlp_layer_types": ["dense", "moe"] * 3}, "mlp_layer_types"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 MiniCPM5MoeForCausalLM"),
])
def test_minicpm5_moe_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(MINICPM, **extra))


def test_axk1_defaults():
    cfg = ModelConfig.from_hf(raw(AXK1, num_hidden_layers=4, head_dim=99))
    moe, mla = cfg.moe, cfg.options.mla
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (192, 8, 2048, 2048)
    assert moe.grouped_sigmoid and moe.renormalize and moe.routed_scaling_factor == 2.5
    assert (moe.num_groups, moe.topk_groups) == (8, 4) and moe.sparse_layers == (False, True, True, True)
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) \
        == (1536, 512, 128, 64, 128)
    assert cfg.head_dim == 576 and cfg.options.interleaved_rope and cfg.options.rotary_dim == 64
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


@pytest.mark.parametrize("arch, name", [(KOLIBRI, "Kolibri"), (MINICPM, "MiniCPM5-MoE"), (AXK1, "A.X K1")])
def test_tensor_parallel_is_refused(arch, name):
    with pytest.raises(TensorParallelConfigError, match=name):
        check(ModelConfig.from_hf(raw(arch)), 2)


def test_kolibri1_names_and_bias(tiny_checkpoints, parity_models):
    model, ref = parity_models("kolibri1")
    assert all(isinstance(layer.mlp, Kolibri1MoeBlock) for layer in model.layers)
    binds(model, ref, model.layers[0].mlp.e_score_correction_bias)
    assert model.enable_lora(1, 4)  # adapters on the attention projections
    # transformers' own module names load alike
    names = {"post_attn_norm": "post_self_attn_layernorm", "post_ffn_norm": "post_mlp_layernorm",
             "moe.router.expert_bias": "mlp.gate.e_score_correction_bias"}

    def internal(name: str) -> str:
        for old, new in names.items():
            name = name.replace(old, new)
        return name
    torch.testing.assert_close(logits_of(reloaded(tiny_checkpoints["kolibri1"], internal)), logits_of(model),
                               atol=0, rtol=0)


def test_minicpm5_moe_gate_binds_and_names(tiny_checkpoints, parity_models):
    model, ref = parity_models("minicpm5_moe")
    binds(model, ref, model.layers[0].self_attn.gate_proj.weight)
    with pytest.raises(CheckpointError, match="LoRA"):
        model.enable_lora(1, 4)
    fused = reloaded(tiny_checkpoints["minicpm5_moe"], lambda n: n.replace(".q_proj.", ".q_gate_proj."))
    torch.testing.assert_close(logits_of(fused), logits_of(model), atol=0, rtol=0)


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
