"""config.json parsing and refusals of the Granite SWA and GraniteMoeSWA
families: the defaults transformers' config classes fill in (checked
against those classes), the per-layer RoPE tables, and a clear
CheckpointError for what the engine does not support. Token parity is in
test_model_parity / test_engine_parity (granite_swa) and test_moe_parity
(granitemoe_swa); at tensor_parallel_size 2 in test_tp_engine (slow)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.rope import build_cos_sin_cache
from splitserve.engine.parallel.plan import check


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

