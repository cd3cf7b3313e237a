"""config.json parsing of the OLMo 3, EXAONE 4, ERNIE 4.5 and HunYuan dense
families: the defaults transformers' config classes fill in (checked
against those classes), RoPE per layer type, windows and NoPE layers,
HunYuan's NTK-alpha base, and a clear CheckpointError for what the engine
does not support. Token parity is in test_model_parity / test_engine_parity
(variants olmo3, exaone4, ernie4_5, hunyuan_dense), at tensor_parallel_size
2 in test_tp_engine, through the live hand-off in test_family_handoff."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.rope import build_cos_sin_cache, inv_freq_and_scale
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import prompt_logits


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 256, **extra}


def hf_config(cls_name: str, cfg: dict):
    import transformers

    return getattr(transformers, cls_name)(**{k: v for k, v in cfg.items() if k != "architectures"})


def test_olmo3_defaults():
    cfg = ModelConfig.from_hf(raw("Olmo3ForCausalLM", num_hidden_layers=4))
    assert cfg.family == "olmo3" and cfg.qk_norm and cfg.rms_norm_eps == 1e-5
    assert not cfg.tie_word_embeddings and cfg.eos_token_ids == (50279,) and cfg.bos_token_id is None
    # every fourth layer full attention, the others a window of 4096
    assert cfg.layer_windows == (4096, 4096, 4096, 0) and cfg.sliding_window == 4096
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (False, False, False)
    opts = cfg.options
    assert opts.post_norms and opts.full_qk_norm and opts.norm_fp32_product
    assert opts.local_rope_layers == (0, 1, 2) and opts.local_rope_theta == 500000.0
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is None
    cfg = ModelConfig.from_hf(raw("Olmo3ForCausalLM", attention_bias=True))
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, False)


@pytest.mark.parametrize("rope", [
    # an older config: top-level rope_theta and rope_scaling, the full-attention layers' only
    # (and the sliding ones keep 500000: Olmo3Config pops rope_theta once)
    {"rope_theta": 1000.0, "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
                                            "original_max_position_embeddings": 32,
                                            "attention_factor": 1.2}},
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 7.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 3.0}}},
    {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 7.0}}},
])
def test_olmo3_rope_per_layer_type_as_transformers_reads_it(rope):
    cfg = raw("Olmo3ForCausalLM", layer_types=["sliding_attention", "full_attention"], **rope)
    ours = ModelConfig.from_hf(cfg)
    ref = hf_config("Olmo3Config", cfg).rope_parameters
    full, sliding = ref["full_attention"], ref["sliding_attention"]
    assert ours.rope_theta == full["rope_theta"]
    assert ours.options.local_rope_theta == sliding["rope_theta"] and ours.options.local_rope_layers == (0,)
    kind = full["rope_type"]
    assert (ours.rope_scaling or {}).get("rope_type", "default") == kind
    if kind != "default":
        assert ours.rope_scaling["factor"] == full["factor"]


def test_exaone4_defaults_and_layer_types():
    cfg = ModelConfig.from_hf(raw("Exaone4ForCausalLM", num_hidden_layers=8))
    assert cfg.family == "exaone4" and cfg.qk_norm and cfg.rms_norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (0, (2,)) and not cfg.tie_word_embeddings
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (False, False, False)
    assert cfg.layer_windows == (4096, 4096, 4096, 0) * 2
    opts = cfg.options
    assert opts.post_norms and not opts.full_qk_norm and not opts.norm_fp32_product
    assert opts.nope_layers == (3, 7)  # the full-attention layers, while a window is set
    # transformers' own derivation of the layer types
    for extra in ({}, {"sliding_window_pattern": 3}):
        c = raw("Exaone4ForCausalLM", num_hidden_layers=7, **extra)
        want = hf_config("Exaone4Config", c).layer_types
        got = ModelConfig.from_hf(c).layer_windows
        assert [w > 0 for w in got] == [t == "sliding_attention" for t in want]
    # no window: every layer full attention and rotating
    cfg = ModelConfig.from_hf(raw("Exaone4ForCausalLM", sliding_window=None,
                                  layer_types=["full_attention"] * 2, sliding_window_pattern="LLLG"))
    assert cfg.layer_windows == (0, 0) and cfg.options.nope_layers == ()
    # a window but no sliding layer: no layer rotates
    cfg = ModelConfig.from_hf(raw("Exaone4ForCausalLM", layer_types=["full_attention"] * 2))
    assert cfg.layer_windows == (0, 0) and cfg.options.nope_layers == (0, 1)


def test_ernie4_5_defaults():
    c = raw("Ernie4_5ForCausalLM")
    del c["head_dim"], c["num_key_value_heads"]
    cfg = ModelConfig.from_hf(c)
    assert cfg.family == "ernie4_5" and cfg.head_dim == 128 and cfg.num_kv_heads == 2
    assert cfg.tie_word_embeddings and cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,)) and cfg.options.interleaved_rope
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (False, False, False)
    cfg = ModelConfig.from_hf(raw("Ernie4_5ForCausalLM", head_dim=None, use_bias=True, rope_theta=9.0,
                                  tie_word_embeddings=False))
    assert cfg.head_dim == 16 and cfg.rope_theta == 9.0 and not cfg.tie_word_embeddings
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)


def test_hunyuan_defaults_and_ntk_alpha_base():
    from transformers.models.hunyuan_v1_dense.modeling_hunyuan_v1_dense import HunYuanDenseV1RotaryEmbedding

    cfg = ModelConfig.from_hf(raw("HunYuanDenseV1ForCausalLM", mlp_bias=True, num_experts=4))
    assert cfg.family == "hunyuan_v1_dense" and cfg.qk_norm and cfg.options.qk_norm_after_rope
    assert cfg.moe is None and cfg.rope_theta == 10000.0 and cfg.rms_norm_eps == 1e-5
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (False, False, False)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,)) and not cfg.tie_word_embeddings
    for rope in ({"rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0}, "rope_theta": 10000.0},
                 {"rope_parameters": {"rope_type": "dynamic", "alpha": 7, "factor": 1.0, "rope_theta": 500.0}},
                 {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}}):
        c = raw("HunYuanDenseV1ForCausalLM", attention_bias=True, **rope)
        ours = ModelConfig.from_hf(c)
        assert ours.o_proj_bias
        want = HunYuanDenseV1RotaryEmbedding(hf_config("HunYuanDenseV1Config", c)).inv_freq
        assert torch.equal(inv_freq_and_scale(ours)[0], want)


@pytest.mark.parametrize("arch, extra, match", [
    ("Olmo3ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}},
     "must be nested by layer type"),
    ("Olmo3ForCausalLM", {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope scaling 'linear' on the sliding-window layers"),
    ("Olmo3ForCausalLM", {"sliding_window": None}, "sliding_window is null but layer_types"),
    ("Olmo3ForCausalLM", {"layer_types": ["full_attention"]}, "layer_types has 1 entries for 2 layers"),
    ("Olmo3ForCausalLM", {"layer_types": ["chunked_attention"] * 2}, "'chunked_attention'] are not supported"),
    ("Olmo3ForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 \\(full_attention\\)"),
    ("Olmo3ForCausalLM", {"hidden_act": "relu"}, "activation 'relu' is not supported for olmo3"),
    ("Exaone4ForCausalLM", {"sliding_window_pattern": "LLLG"}, "sliding_window_pattern 'LLLG' needs layer_types"),
    ("Exaone4ForCausalLM", {"sliding_window": None}, "a null sliding_window needs layer_types"),
    ("Exaone4ForCausalLM", {"sliding_window": None, "layer_types": ["sliding_attention"] * 2},
     "sliding_window is null but layer_types"),
    ("Ernie4_5ForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    ("Ernie4_5ForCausalLM", {"quantization_config": {"quant_method": "fp8"}},
     "fp8 Ernie4_5ForCausalLM checkpoints are not supported"),
    ("HunYuanDenseV1ForCausalLM", {"head_dim": None}, "missing required key 'head_dim'"),
    ("HunYuanDenseV1ForCausalLM", {"quantization_config": {"quant_method": "fp8"}},
     "fp8 HunYuanDenseV1ForCausalLM checkpoints are not supported"),
])
def test_unsupported_options_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


def test_tensor_parallel_splits_by_heads():
    for arch in ("Exaone4ForCausalLM", "Ernie4_5ForCausalLM", "HunYuanDenseV1ForCausalLM"):
        check(ModelConfig.from_hf(raw(arch)), 2)  # test_tp_engine checks their tokens at TP=2
    olmo3 = ModelConfig.from_hf(raw("Olmo3ForCausalLM"))  # all-head q/k norms, as OLMo 2's
    check(olmo3, 4)
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(4\) is not a multiple"):
        check(olmo3, 3)


def test_variants_exercise_their_differences(tiny_checkpoints):
    # HunYuan's norms after RoPE and OLMo 3's sliding-layer table change the logits
    # (else parity would not tell them apart from the Llama order / one table)
    model = load_model(load_checkpoint(tiny_checkpoints["hunyuan_dense"]), torch.float32)
    want = prompt_logits(model)
    for layer in model.layers:
        layer.self_attn.qk_norm_after_rope = False
    assert (prompt_logits(model) - want).abs().max() > 1e-2
    model = load_model(load_checkpoint(tiny_checkpoints["olmo3"]), torch.float32)
    want = prompt_logits(model)
    model.local_cos_sin_cache = build_cos_sin_cache(model.cfg)
    assert (prompt_logits(model) - want).abs().max() > 1e-2
