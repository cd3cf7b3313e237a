"""config.json parsing of the Mamba-2 hybrids (Granite 4.0-H, Bamba,
Nemotron-H): the defaults transformers' config classes fill in, the options
read, and a clear CheckpointError (or tensor-parallel refusal) naming what
the engine does not support. Token parity is in test_hybrid_parity."""

from __future__ import annotations

import math

import pytest
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.mamba2_config import SSM_KIND
from splitserve.engine.parallel.plan import TensorParallelConfigError, check

GRANITE_H = "GraniteMoeHybridForCausalLM"


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 256, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, **extra}


# --- Granite 4.0-H -----------------------------------------------------------

def test_granite_h_defaults():
    cfg = ModelConfig.from_hf(raw(GRANITE_H, layer_types=["mamba", "attention"]))
    opts = cfg.options
    assert opts.hybrid.layer_kinds == (SSM_KIND, ATTENTION) and cfg.num_cache_layers == 1
    m = opts.mamba2
    # GraniteMoeHybridConfig: 128 heads over mamba_expand (2) x hidden, 256-dim states in 1 group
    assert (m.num_heads, m.head_dim, m.n_groups, m.state_size, m.conv_kernel) == (128, 4, 1, 256, 4)
    assert m.conv_bias and not m.proj_bias and m.time_step_limit == (0.0, math.inf)
    assert not m.norm_before_gate
    assert opts.nope_layers == (0, 1)  # position_embedding_type null: no RoPE
    assert (opts.embed_scale, opts.attn_scale, opts.residual_scale, opts.logits_divisor) == (1, 1, 1, 1)
    # 8 experts (top 2) of intermediate_size, the shared MLP of 1024
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_intermediate_size) == (8, 2, 128)
    assert cfg.moe.renormalize and cfg.intermediate_size == 1024
    assert opts.hybrid.states[1].shape == (128, 4, 256) and opts.hybrid.states[1].dtype == "float32"


def test_granite_h_options_read():
    cfg = ModelConfig.from_hf(raw(
        GRANITE_H, layers_block_type=["attention", "mamba"], position_embedding_type="rope",
        num_local_experts=0, shared_intermediate_size=64, mamba_n_heads=8, mamba_d_head=64,
        mamba_n_groups=4, time_step_limit=[0.001, {"__float__": "Infinity"}], attention_bias=True))
    assert cfg.options.hybrid.layer_kinds == (ATTENTION, SSM_KIND)
    assert cfg.options.nope_layers == () and cfg.moe is None and cfg.intermediate_size == 64
    assert cfg.options.mamba2.time_step_limit == (0.001, math.inf) and cfg.options.mamba2.n_groups == 4
    assert cfg.attention_bias and cfg.o_proj_bias


@pytest.mark.parametrize("extra, match", [
    ({"layer_types": None}, "no attention layer"),
    ({"layer_types": ["mamba", "sliding_attention"]}, "layer_types.*sliding_attention"),
    ({"layer_types": ["mamba"]}, "layer_types has 1 entries for 2 layers"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type 'alibi'"),
    ({"mamba_d_head": 32}, "mamba_n_heads 128 x mamba_d_head 32"),
    ({"mamba_n_heads": 8, "mamba_n_groups": 3}, "mamba_n_groups 3 must divide"),
    ({"mamba_d_conv": 1}, "mamba_d_conv 1"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"shared_intermediate_size": 0}, "shared_intermediate_size 0"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_granite_h_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(GRANITE_H, **{"layer_types": ["mamba", "attention"], **extra}))


def test_granite_h_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="Mamba-2"):
        check(ModelConfig.from_hf(raw(GRANITE_H, layer_types=["mamba", "attention"])), 2)



# --- Bamba ---------------------------------------------------------------------

BAMBA = "BambaForCausalLM"


def test_bamba_defaults():
    cfg = ModelConfig.from_hf(raw(BAMBA, num_hidden_layers=3, attn_layer_indices=[2]))
    opts = cfg.options
    assert opts.hybrid.layer_kinds == (SSM_KIND, SSM_KIND, ATTENTION) and cfg.num_cache_layers == 1
    assert opts.rotary_dim == 32  # BambaConfig rotates half of each head (64) by default
    assert opts.final_norm_name == "model.final_layernorm" and cfg.rms_norm_eps == 1e-5
    m = opts.mamba2
    assert (m.num_heads, m.head_dim, m.n_groups, m.state_size, m.conv_kernel) == (128, 4, 1, 256, 4)
    assert cfg.moe is None and not cfg.attention_bias and not cfg.mlp_bias


def test_bamba_rope_dict_rotary_factor_wins():
    # a top-level partial_rotary_factor is overwritten by BambaConfig; the rope dict's is read
    cfg = ModelConfig.from_hf(raw(BAMBA, attn_layer_indices=[0], partial_rotary_factor=1.0, rope_parameters={
        "rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.25}))
    assert cfg.options.rotary_dim == 16 and cfg.rope_theta == 1000.0


@pytest.mark.parametrize("extra, match", [
    ({"attn_layer_indices": None}, "no attention layer"),
    ({"attn_layer_indices": [5]}, "attn_layer_indices \\[5\\]"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mamba_expand": 3, "mamba_n_heads": 100}, "mamba_n_heads 100 x mamba_d_head 7"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_bamba_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(BAMBA, **{"attn_layer_indices": [1], **extra}))


def lora_pair(name: str, d_in: int, d_out: int, root: str = "model") -> dict:
    """The shapes of PEFT's lora_A / lora_B (rank 4) on ``<root>.layers.<name>``."""
    return {f"base_model.model.{root}.layers.{name}.lora_A.weight": (4, d_in),
            f"base_model.model.{root}.layers.{name}.lora_B.weight": (d_out, 4)}


def lora_layout(model: ModelConfig, tensors: dict):
    from splitserve.engine.lora.adapter import parse_adapter_config
    from splitserve.engine.lora.layout import adapter_layout

    cfg = parse_adapter_config({"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    return adapter_layout(cfg, tensors, model, 8)


def lora_refused(model: ModelConfig, cases) -> None:
    """Each (name, in, out, message) pair is refused with the message."""
    from splitserve.engine.errors import AdapterError

    for name, d_in, d_out, match, *root in cases:
        with pytest.raises(AdapterError, match=match):
            lora_layout(model, lora_pair(name, d_in, d_out, *root))


def in_proj_rows(model: ModelConfig) -> int:
    s = model.options.mamba2
    return s.inner + s.conv_dim + s.num_heads


def test_granite_h_lora_on_attention_mixers_and_shared_mlp():
    model = ModelConfig.from_hf(raw(GRANITE_H, layer_types=["mamba", "attention"]))  # with experts
    s, h, i, rows = model.options.mamba2, model.hidden_size, model.intermediate_size, in_proj_rows(model)
    ok = {**lora_pair("0.mamba.in_proj", h, rows), **lora_pair("0.mamba.out_proj", s.inner, h),
          **lora_pair("1.self_attn.q_proj", h, 4 * model.head_dim),
          **lora_pair("0.shared_mlp.input_linear", h, 2 * i), **lora_pair("1.shared_mlp.output_linear", i, h)}
    modules = lora_layout(model, ok).modules
    assert sorted(modules) == [(0, "gate_proj"), (0, "in_proj"), (0, "out_proj"), (0, "up_proj"),
                               (1, "down_proj"), (1, "q_proj")]
    # the fused input_linear: one lora_B, its gate rows then its up rows
    assert (modules[(0, "gate_proj")].b_rows, modules[(0, "up_proj")].b_rows) == ((0, i), (i, i))
    assert modules[(1, "down_proj")].b_rows == (0, 0)
    lora_refused(model, (("1.mamba.in_proj", h, rows, "attention layer, without a Mamba-2"),
                         ("0.block_sparse_moe.router.layer", h, 8, "MoE experts"),
                         ("0.shared_mlp.gate_proj", h, i, "no lora_A/lora_B weight")))


def test_bamba_lora_on_its_mixers_attention_and_mlps_only():
    model = ModelConfig.from_hf(raw(BAMBA, attn_layer_indices=[1]))  # layer 0: Mamba-2
    s, h, in_rows = model.options.mamba2, model.hidden_size, in_proj_rows(model)
    ok = {**lora_pair("0.mamba.in_proj", h, in_rows), **lora_pair("0.mamba.out_proj", s.inner, h),
          **lora_pair("1.self_attn.q_proj", h, 4 * model.head_dim), **lora_pair("0.feed_forward.up_proj", h, 128)}
    assert sorted(lora_layout(model, ok).modules) == [
        (0, "in_proj"), (0, "out_proj"), (0, "up_proj"), (1, "q_proj")]
    lora_refused(model, (("1.mamba.in_proj", h, in_rows, "attention layer, without a Mamba-2"),
                         ("0.self_attn.q_proj", h, 4 * model.head_dim, "without self_attn"),
                         ("0.mamba.x_proj", h, 8, "nor of a Mamba-2 hybrid's mamba")))
    # another family's MLP is not named feed_forward: refused by name
    lora_refused(ModelConfig.from_hf(raw("LlamaForCausalLM")),
                 (("0.feed_forward.up_proj", h, 128, "no lora_A/lora_B weight"),))


def test_bamba_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="Mamba-2"):
        check(ModelConfig.from_hf(raw(BAMBA, attn_layer_indices=[1])), 2)


# --- Nemotron-H ----------------------------------------------------------------

NEMOTRON_H = "NemotronHForCausalLM"


def nemotron_h(**extra) -> dict:
    out = raw(NEMOTRON_H, **extra)
    del out["num_hidden_layers"]  # NemotronHConfig counts the blocks of its pattern
    return out


def test_nemotron_h_defaults_and_pattern():
    cfg = ModelConfig.from_hf(nemotron_h(hybrid_override_pattern="M-*-MM-"))
    opts = cfg.options
    # M-, *-, M, M-: four decoder layers of the seven blocks
    assert opts.checkpoint_blocks == ((0, 1), (2, 3), (4, -1), (5, 6)) and cfg.num_layers == 4
    assert opts.hybrid.layer_kinds == (SSM_KIND, ATTENTION, SSM_KIND, SSM_KIND)
    m = opts.mamba2
    assert (m.num_heads, m.head_dim, m.n_groups, m.state_size, m.conv_kernel) == (128, 64, 8, 128, 4)
    assert m.conv_bias and not m.proj_bias and m.time_step_limit == (0.0, math.inf)
    assert opts.hidden_act == "relu2" and opts.plain_mlp == ("up_proj", "down_proj")
    assert opts.norm_fp32_product and opts.final_norm_name == "backbone.norm_f" and opts.nope_layers == (1,)
    assert cfg.head_dim == 128 and cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings
    assert not cfg.attention_bias and not cfg.o_proj_bias and cfg.moe is None


def test_nemotron_h_older_names():
    cfg = ModelConfig.from_hf(nemotron_h(layers_block_type=["mamba", "mlp", "attention"], mamba_n_groups=2,
                                         mamba_d_conv=3, mamba_conv_bias=False,
                                         mamba_dt_limit=[0.0, {"__float__": "Infinity"}]))
    m = cfg.options.mamba2
    assert cfg.options.checkpoint_blocks == ((0, 1), (2, -1))
    assert (m.n_groups, m.conv_kernel, m.conv_bias) == (2, 3, False)


def test_nemotron_h_moe_blocks():
    # NemotronHConfig's default pattern: Mamba-2, MoE, attention, MLP
    cfg = ModelConfig.from_hf(nemotron_h(moe_latent_size=256))
    assert cfg.options.checkpoint_blocks == ((0, 1), (2, 3)) and cfg.options.moe_latent_size == 256
    moe = cfg.moe
    assert moe.sparse_layers == (True, False) and moe.grouped_sigmoid and moe.renormalize
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size) == (8, 2, 7688)
    assert (moe.num_groups, moe.topk_groups, moe.routed_scaling_factor) == (1, 1, 1.0)
    assert moe.shared_expert_intermediate_size == 7688 and cfg.intermediate_size == 128  # the MLP blocks'
    assert ModelConfig.from_hf(nemotron_h(hybrid_override_pattern="M-*")).moe is None


@pytest.mark.parametrize("extra, match", [
    ({"hybrid_override_pattern": "ME*-", "n_group": 3}, "n_group 3 must divide n_routed_experts 8"),
    ({"hybrid_override_pattern": "ME*-", "moe_latent_size": -4}, "moe_latent_size"),
    ({"hybrid_override_pattern": "-M*"}, "block 0 \\(mlp\\) does not follow"),
    ({"hybrid_override_pattern": "M--*"}, "block 2 \\(mlp\\) does not follow"),
    ({"hybrid_override_pattern": "M-M-"}, "no attention layer"),
    ({"hybrid_override_pattern": "M-X*"}, "unknown block symbols \\['X'\\]"),
    ({"layers_block_type": ["linear_attention", "sliding_attention"]}, "sliding_attention"),
    ({"hybrid_override_pattern": "M*", "mamba_hidden_act": "gelu"}, "mamba_hidden_act 'gelu'"),
    ({"hybrid_override_pattern": "M*", "mlp_hidden_act": "swiglu"}, "mlp_hidden_act 'swiglu'"),
    ({"hybrid_override_pattern": "M*", "quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_nemotron_h_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(nemotron_h(**extra))


def test_nemotron_h_lora_by_checkpoint_block():
    model = ModelConfig.from_hf(nemotron_h(hybrid_override_pattern="M-*-ME"))  # layers (0, 1), (2, 3), (4, 5)
    s, h, rows, q = model.options.mamba2, model.hidden_size, in_proj_rows(model), 4 * model.head_dim
    # PEFT's block numbers, under transformers 5's model.layers or the older backbone.layers
    ok = {**lora_pair("4.mixer.in_proj", h, rows), **lora_pair("2.mixer.q_proj", h, q),
          **lora_pair("0.mixer.in_proj", h, rows, "backbone"), **lora_pair("3.mixer.down_proj", 128, h)}
    assert sorted(lora_layout(model, ok).modules) == [(0, "in_proj"), (1, "down_proj"), (1, "q_proj"),
                                                      (2, "in_proj")]
    lora_refused(model, (("0.mixer.out_proj", s.inner, h, "PEFT applies no LoRA"),
                         ("2.mixer.in_proj", h, rows, "block 2 is an attention block, whose LoRA targets are q_proj"),
                         ("4.mixer.q_proj", h, q, "block 4 is a Mamba-2 block"),
                         ("3.mixer.gate_proj", h, 128, "block 3 is an MLP block, whose LoRA targets are up_proj"),
                         ("5.mixer.shared_experts.up_proj", h, 8, "block 5 is a mixture-of-experts block"),
                         ("5.mixer.gate", h, 8, "block 5 is a mixture-of-experts block"),
                         ("6.mixer.in_proj", h, rows, "it is for block 6; the model has 6 blocks"),
                         ("0.mamba.in_proj", h, rows, "no lora_A/lora_B weight")))


def test_nemotron_h_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="Mamba-2"):
        check(ModelConfig.from_hf(nemotron_h(hybrid_override_pattern="M*")), 2)
