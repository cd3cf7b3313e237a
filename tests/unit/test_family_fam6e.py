"""config.json parsing and refusals of the Granite SWA, GraniteMoeSWA and
CodeGen families: the defaults transformers' config classes fill in
(checked against those classes), the per-layer RoPE tables, CodeGen's
4-shard qkv_proj split, and a clear CheckpointError (or tensor-parallel
refusal) for what the engine does not support. Token parity is in
test_model_parity / test_engine_parity (granite_swa, codegen) and
test_moe_parity (granitemoe_swa); at tensor_parallel_size 2 in
test_tp_engine (slow)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.rope import build_cos_sin_cache
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import prompt_logits

LOGIT_REL_BOUND = 0.1  # fp8 weights: close to the full-precision logits, not equal


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, **extra}


def hf_config(cls_name: str, cfg: dict):
    import transformers

    return getattr(transformers, cls_name)(**{k: v for k, v in cfg.items() if k != "architectures"})


def refused(cfg: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(cfg)


# --- Granite SWA, GraniteMoeSWA -------------------------------------------------

# (architecture, its transformers config class): the families of Granite SWA's attention
SWA_FAMILIES = [("GraniteSWAForCausalLM", "GraniteSWAConfig"),
                ("GraniteMoeSWAForCausalLM", "GraniteMoeSWAConfig")]


@pytest.mark.parametrize("arch,cls_name", SWA_FAMILIES)
def test_granite_swa_defaults_as_its_config_class(arch, cls_name):
    cfg = raw(arch)
    ours, ref = ModelConfig.from_hf(cfg), hf_config(cls_name, cfg)
    windows = tuple(ref.sliding_window if t == "sliding_attention" else 0 for t in ref.layer_types)
    assert ours.layer_windows == windows == (0, 128, 128, 128, 0, 128)
    assert ours.num_kv_heads == ref.num_key_value_heads and ours.rms_norm_eps == ref.rms_norm_eps
    assert ours.tie_word_embeddings == ref.tie_word_embeddings
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    assert ours.max_position == ref.max_position_embeddings
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] and ours.rope_scaling is None
    assert ours.options.attention_sinks and ours.options.layer_rope_thetas == ()
    assert set(ref.layer_rope_theta) == {ours.rope_theta}  # every layer the model's base
    assert (ours.options.attn_scale, ours.options.embed_scale) == (1.0, 1.0)


def test_granitemoe_swa_reads_granitemoe_shared_keys():
    cfg = ModelConfig.from_hf(raw("GraniteMoeSWAForCausalLM", shared_intermediate_size=48,
                                  num_local_experts=4, attention_bias=True, sliding_window=8,
                                  layer_types=["full_attention", "sliding_attention"] * 3))
    assert cfg.family == "granitemoe_swa" and cfg.intermediate_size == 48
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_intermediate_size) == (4, 2, 128)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, False)
    assert cfg.layer_windows == (0, 8) * 3
    check(cfg, 2)  # Granite's layers, experts split like Mixtral's: splits across ranks


def test_granite_swa_rope_table_per_layer(parity_models):
    # layer_rope_theta [10000, 0, 500] with linear scaling: a table per base, the scaling kept
    model, ref = parity_models("granite_swa")
    assert model.rope_table(1) is None
    for layer, theta in ((0, 10000.0), (2, 500.0)):
        want = build_cos_sin_cache(dataclasses.replace(model.cfg, rope_theta=theta))
        torch.testing.assert_close(model.rope_table(layer), want, atol=0, rtol=0)
        emb = next(e for e in ref.model.rotary_embs if e.config.rope_parameters["rope_theta"] == theta)
        cos, sin = emb(torch.zeros(1), torch.arange(40)[None])  # [1, 40, head_dim]: halves repeated
        torch.testing.assert_close(model.rope_table(layer)[:40], torch.cat([cos[0, :, :8], sin[0, :, :8]], 1))
    check(model.cfg, 2)  # sinks go with their heads (as gpt-oss's)


@pytest.mark.parametrize("extra,match", [
    ({"sliding_window": None}, "sliding_window is null but layer_types has sliding_attention"),
    ({"layer_types": ["full_attention"] * 5}, "layer_types has 5 entries for 6 layers"),
    ({"layer_types": ["chunked_attention"] * 6}, "layer_types .*chunked_attention.* not supported"),
    ({"layer_rope_theta": [10000.0] * 5}, "layer_rope_theta must list one RoPE base per layer"),
    ({"layer_rope_theta": [10000.0, -1, 0, 0, 0, 0]}, "layer_rope_theta must hold non-negative"),
])
@pytest.mark.parametrize("arch", [arch for arch, _ in SWA_FAMILIES])
def test_granite_swa_refusals(arch, extra, match):
    refused(raw(arch, **extra), match)


def test_granitemoe_swa_refuses_fp8_checkpoints():
    refused(raw("GraniteMoeSWAForCausalLM", quantization_config={"quant_method": "fp8"}),
            "fp8 GraniteMoeSWA checkpoints are not supported")


def test_granite_swa_takes_lora_on_its_projections(parity_models):
    model, _ = parity_models("granite_swa")
    assert {name for _, name in model.enable_lora(1, 4)} >= {"q_proj", "o_proj", "gate_proj"}


# --- CodeGen --------------------------------------------------------------------

def codegen(**extra) -> dict:  # heads of 64 dims: the default rotary_dim (64) fits
    return {"architectures": ["CodeGenForCausalLM"], "vocab_size": 32, "n_embd": 256, "n_layer": 2,
            "n_head": 4, **extra}


def test_codegen_defaults_as_its_config_class():
    cfg = codegen()
    ours, ref = ModelConfig.from_hf(cfg), hf_config("CodeGenConfig", cfg)
    assert ours.family == "codegen" and ours.head_dim == 64 and ours.num_kv_heads == 4
    assert ours.intermediate_size == 4 * ref.n_embd and ours.max_position == ref.n_positions
    assert ours.rms_norm_eps == ref.layer_norm_epsilon and not ours.tie_word_embeddings
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (False, False, True)
    opts = ours.options
    assert opts.interleaved_rope and opts.parallel_residual and opts.lm_head_bias
    assert opts.rotary_dim is None  # its default 64: every dim of these heads
    assert ModelConfig.from_hf(codegen(rotary_dim=8)).options.rotary_dim == 8


def test_codegen_splits_qkv_proj_as_codegen_attention(parity_models):
    # the attention's q / k / v of one token, from the fused weight as CodeGenAttention reads it
    model, ref = parity_models("codegen")
    attn, x = ref.transformer.h[0].attn, torch.randn(1, 3, 64)
    qkv = attn.qkv_proj(x).view(1, 3, 4, -1)
    q, v, k = (t.reshape(1, 3, 64) for t in qkv.split(16, dim=-1))
    ours = model.layers[0].self_attn.qkv_proj.weight
    got_v = x @ ours[128:].T  # values are not reordered: [q | k | v] rows
    torch.testing.assert_close(got_v, v)
    assert not torch.allclose(q, k)


@pytest.mark.parametrize("extra,match", [
    ({"n_embd": 30, "n_head": 5, "rotary_dim": 4}, "n_embd \\(30\\) must be a multiple of 4"),
    ({"rotary_dim": None}, "rotary_dim None is not supported for codegen"),
    ({"rotary_dim": 7}, "rotary_dim 7 is not supported for codegen"),
    ({"rotary_dim": 128}, "rotary_dim 128 is not supported for codegen"),
    ({"rotary_dim": 8, "activation_function": "swish_fast"}, "activation_function 'swish_fast'"),
    ({"rotary_dim": 8, "quantization_config": {"quant_method": "fp8"}},
     "fp8 codegen checkpoints are not supported \\(the fused qkv_proj"),
])
def test_codegen_refusals(extra, match):
    refused(codegen(**extra), match)


def test_codegen_takes_lora_and_splits_by_heads(parity_models):
    model, _ = parity_models("codegen")
    # qkv_proj's q/k/v parts, GPT-J's names beside (PEFT parity: test_lora_engine)
    assert {name for _, name in model.enable_lora(1, 4)} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                             "fc_in", "fc_out"}
    check(model.cfg, 2)  # qkv_proj split at load, then sharded as q/k/v
    with pytest.raises(TensorParallelConfigError, match="CodeGenForCausalLM cannot run at tensor_parallel_size 3"):
        check(model.cfg, 3)


def test_codegen_refuses_a_misshapen_qkv_proj(parity_models):
    model, _ = parity_models("codegen")
    with pytest.raises(CheckpointError, match="qkv_proj.weight'?: expected shape \\[192, 64\\]"):
        model.load_weights([("transformer.h.0.attn.qkv_proj.weight", torch.zeros(64, 64))])


def test_codegen_weight_dtype_fp8_quantizes_at_load(tiny_checkpoints, parity_models):
    model = load_model(load_checkpoint(tiny_checkpoints["codegen"]), torch.float32, weight_dtype="fp8")
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    full, _ = parity_models("codegen")
    logits, ref = prompt_logits(model), prompt_logits(full)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < LOGIT_REL_BOUND
