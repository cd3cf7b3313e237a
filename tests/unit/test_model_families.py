"""Gemma, Gemma 2, Gemma 3, Phi-3, Granite, OLMo 2 and SmolLM3 beyond the
shared parity tests (test_model_parity, test_engine_parity and
test_engine_triton_parity run their tiny checkpoints): what config.json says
about each family (old and transformers 5 layouts alike), the checkpoints
refused with a clear error, LongRoPE against transformers past the original
context length, and the families' engines with a window, partial rotary and
soft caps over long prompts; that each of Granite's multipliers, OLMo 2's
norms, Gemma 3's second RoPE base and SmolLM3's NoPE layers moves the
logits, and OLMo 2 refused for tensor parallelism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models import build_model
from splitserve.engine.models.rope import build_cos_sin_cache
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.unit.test_engine_parity import prompt_set
from tests.unit.test_model_parity import prompt_logits

BASE = {"vocab_size": 32, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256}


def config(arch: str, **extra) -> ModelConfig:
    return ModelConfig.from_hf({"architectures": [arch], **BASE, **extra})


def test_gemma_options_parsed_as_transformers_reads_them():
    g = config("GemmaForCausalLM", hidden_act="gelu")  # legacy name of the tanh GELU
    o = g.options
    assert (o.hidden_act, o.norm_plus_one, o.embed_scale, o.sandwich_norms) == ("gelu_tanh", True, 8.0, False)
    assert g.layer_windows == (0, 0, 0, 0) and o.attn_softcap == o.final_softcap == 0.0
    g2 = config("Gemma2ForCausalLM", sliding_window=8, query_pre_attn_scalar=64,
                attn_logit_softcapping=50.0, final_logit_softcapping=None)
    o = g2.options
    assert g2.layer_windows == (8, 0, 8, 0)  # every other layer, from layer 0
    assert (o.attn_scale, o.attn_softcap, o.final_softcap, o.sandwich_norms) == (0.125, 50.0, 0.0, True)
    typed = config("Gemma2ForCausalLM", sliding_window=8,
                   layer_types=["full_attention", "sliding_attention"] * 2)
    assert typed.layer_windows == (0, 8, 0, 8)
    # caps left out of config.json: Gemma2Config's defaults, as transformers reads them
    assert (typed.options.attn_softcap, typed.options.final_softcap) == (50.0, 30.0)
    bare = _via_transformers("Gemma2Config", "Gemma2ForCausalLM")
    assert (bare.options.attn_softcap, bare.options.final_softcap) == (50.0, 30.0)


def test_granite_and_olmo2_options():
    g = config("GraniteForCausalLM", embedding_multiplier=12, residual_multiplier=0.22,
               attention_multiplier=0.0078125, logits_scaling=8, mlp_bias=True, attention_bias=True)
    o = g.options
    assert (o.embed_scale, o.residual_scale, o.attn_scale, o.logits_divisor) == (12.0, 0.22, 0.0078125, 8.0)
    assert g.mlp_bias and g.attention_bias and g.o_proj_bias and not g.qk_norm
    assert config("GraniteForCausalLM").options.logits_divisor == 1.0  # transformers' defaults
    assert config("GraniteForCausalLM").options.attn_scale == 1.0
    m = config("Olmo2ForCausalLM", sliding_window=8)
    assert m.qk_norm and m.options.full_qk_norm and m.options.post_norms
    assert m.layer_windows == (0, 0, 0, 0) and not m.attention_bias and not m.mlp_bias


def _via_transformers(config_cls: str, arch: str, **extra) -> ModelConfig:
    # the config.json transformers 5 writes for these arguments
    import transformers

    written = getattr(transformers, config_cls)(**BASE, **extra).to_dict()
    return ModelConfig.from_hf({**written, "architectures": [arch]})


# a Gemma 3 config.json as transformers < 5 wrote them (google/gemma-3-4b-it's text part)
GEMMA3_OLD = dict(sliding_window=8, sliding_window_pattern=2, rope_theta=1_000_000.0,
                  rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  query_pre_attn_scalar=64, final_logit_softcapping=None, attn_logit_softcapping=None,
                  hidden_activation="gelu_pytorch_tanh")


def test_gemma3_options_from_either_config_layout():
    old = config("Gemma3ForCausalLM", **GEMMA3_OLD)
    new = _via_transformers("Gemma3TextConfig", "Gemma3ForCausalLM", **GEMMA3_OLD)
    for cfg in (old, new):
        o = cfg.options
        assert cfg.layer_windows == (8, 0, 8, 0) and cfg.qk_norm and not cfg.attention_bias
        assert (cfg.rope_theta, cfg.rope_scaling["factor"]) == (1_000_000.0, 8.0)
        assert (o.local_rope_layers, o.local_rope_theta) == ((0, 2), 10_000.0)
        assert (o.attn_scale, o.attn_softcap, o.final_softcap) == (0.125, 0.0, 0.0)
        assert (o.hidden_act, o.embed_scale, o.sandwich_norms) == ("gelu_tanh", 8.0, True)
    assert old.options == new.options and old.rope_scaling["rope_type"] == new.rope_scaling["rope_type"]
    # transformers' defaults: a window of 4096 on all but every 6th layer, bases 1e6 and 1e4
    bare = config("Gemma3ForCausalLM", num_hidden_layers=7)
    assert bare.layer_windows == (4096,) * 5 + (0, 4096) and bare.rope_theta == 1_000_000.0
    assert bare.options.local_rope_theta == 10_000.0 and bare.rope_scaling is None
    assert bare.options.local_rope_layers == (0, 1, 2, 3, 4, 6)
    assert config("Gemma3ForCausalLM", hidden_act="silu").options.hidden_act == "gelu_tanh"
    capped = config("Gemma3ForCausalLM", attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    assert (capped.options.attn_softcap, capped.options.final_softcap) == (0.0, 30.0)


def test_smollm3_options_from_either_config_layout():
    old = config("SmolLM3ForCausalLM", rope_theta=5_000_000.0)
    new = _via_transformers("SmolLM3Config", "SmolLM3ForCausalLM", rope_theta=5_000_000.0)
    for cfg in (old, new):  # every 4th layer without RoPE, by default; no window
        assert cfg.options.nope_layers == (3,) and cfg.rope_theta == 5_000_000.0
        assert cfg.layer_windows == (0,) * 4 and not cfg.qk_norm
    assert config("SmolLM3ForCausalLM").rope_theta == 2_000_000.0  # transformers' default
    listed = config("SmolLM3ForCausalLM", no_rope_layers=[0, 1, 1, 0, 1], use_sliding_window=True,
                    sliding_window=8, attention_bias=True, mlp_bias=True)
    assert listed.options.nope_layers == (0, 3)
    assert listed.layer_windows == (8, 0, 0, 8)  # windows on the NoPE layers, as transformers marks them
    assert listed.attention_bias and listed.o_proj_bias and listed.mlp_bias
    windowed = _via_transformers("SmolLM3Config", "SmolLM3ForCausalLM", no_rope_layers=[0, 1, 1, 0],
                                 use_sliding_window=True, sliding_window=8)
    assert windowed.layer_windows == (8, 0, 0, 8)


def test_phi3_options():
    p = config("Phi3ForCausalLM", sliding_window=2047, partial_rotary_factor=0.75)
    assert p.layer_windows == (2047,) * 4 and p.options.fused_projections
    assert p.options.rotary_dim == 12 and not p.attention_bias
    assert build_cos_sin_cache(p).shape == (256, 12)
    assert config("Phi3ForCausalLM").options.rotary_dim is None


@pytest.mark.parametrize("arch, extra, match", [
    ("Gemma2ForCausalLM", {"use_bidirectional_attention": True}, "not a causal language model"),
    ("GemmaForCausalLM", {"hidden_act": "relu"}, "activation 'relu' is not supported for gemma"),
    ("Gemma2ForCausalLM", {"attn_logit_softcapping": -1}, "attn_logit_softcapping must be positive"),
    ("GraniteForCausalLM", {"logits_scaling": 0}, "logits_scaling must be a positive number"),
    ("GraniteForCausalLM", {"residual_multiplier": -0.5}, "residual_multiplier must be a positive"),
    ("Olmo2ForCausalLM", {"hidden_act": "relu"}, "activation 'relu' is not supported for olmo2"),
    ("Phi3ForCausalLM", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "write it as 'longrope'"),
    ("Phi3ForCausalLM", {"partial_rotary_factor": 0.1875}, "an even number"),
    ("Phi3ForCausalLM", {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}},
     "fp8 Phi3ForCausalLM checkpoints"),
    ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, "not a causal language model"),
    ("Gemma3ForCausalLM", {"sliding_window": None}, "sliding_window is null"),
    ("Gemma3ForCausalLM", {"layer_types": ["full_attention"] * 3}, "layer_types has 3 entries"),
    ("Gemma3ForCausalLM", {"layer_types": ["chunked_attention"] * 4}, "'chunked_attention'.*not supported"),
    ("Gemma3ForCausalLM", {"rope_parameters": {"rope_type": "linear", "factor": 8.0}},
     "nested by layer type"),
    ("Gemma3ForCausalLM", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "'linear' on the sliding-window layers is not supported"),
    ("Gemma3ForCausalLM", {"hidden_activation": "relu"}, "activation 'relu' is not supported for gemma3"),
    ("SmolLM3ForCausalLM", {"no_rope_layers": [1, 0]}, "no_rope_layers has 2 entries for 4 layers"),
    ("SmolLM3ForCausalLM", {"hidden_act": "relu"}, "activation 'relu' is not supported for smollm3"),
])
def test_checkpoints_the_families_cannot_serve_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        config(arch, **extra)


def test_longrope_needs_its_factors():
    cfg = config("Phi3ForCausalLM", original_max_position_embeddings=64,
                 rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 7})
    with pytest.raises(CheckpointError, match="long_factor as a list of 8 numbers"):
        build_cos_sin_cache(cfg)


def test_an_unsupported_architecture_names_the_supported_ones():
    # Gemma 3's multimodal checkpoints (vision tower, language_model.* tensors) are not served
    with pytest.raises(CheckpointError, match="unsupported architecture.*Gemma2ForCausalLM.*Phi3ForCausalLM"
                       ".*GraniteForCausalLM.*Olmo2ForCausalLM.*Gemma3ForCausalLM.*SmolLM3ForCausalLM"):
        config("Gemma3ForConditionalGeneration")


def test_longrope_table_matches_transformers_short_and_long(tiny_checkpoints):
    from transformers.modeling_rope_utils import _compute_longrope_parameters

    path = tiny_checkpoints["phi3_longrope"]
    cfg = load_checkpoint(path).model_config
    hf_cfg = hf_model(path).config
    table = build_cos_sin_cache(cfg)
    assert table.shape == (256, 8)  # partial_rotary_factor 0.5 of head_dim 16
    positions = torch.arange(256, dtype=torch.float)
    # positions below the original length 64: the short factors; from it on, the long ones
    for rows, seq_len in ((slice(0, 64), 64), (slice(64, 256), 65)):
        inv_freq, amplitude = _compute_longrope_parameters(hf_cfg, seq_len=seq_len)
        assert amplitude > 1.0
        freqs = positions[rows, None] * inv_freq[None, :]
        torch.testing.assert_close(table[rows, :4], freqs.cos() * amplitude, atol=1e-6, rtol=0)
        torch.testing.assert_close(table[rows, 4:], freqs.sin() * amplitude, atol=1e-6, rtol=0)


@torch.no_grad()
def test_longrope_past_the_original_length_matches_stepwise_transformers(tiny_checkpoints):
    """A 60-token prompt decoded to position 67: transformers' forward one
    token at a time with its cache (long factors from position 64 on) gives
    the same tokens. (Its ``generate`` instead re-prefills the whole sequence
    with the long factors once it crosses 64, which a paged cache does not.)"""
    path = tiny_checkpoints["phi3_longrope"]
    ref = hf_model(path)
    prompt = prompt_set(ref.config.vocab_size)[-1]
    assert len(prompt) == 60
    out = ref(torch.tensor([prompt]), use_cache=True)
    cache, want = out.past_key_values, [int(out.logits[0, -1].argmax())]
    for i in range(7):
        out = ref(torch.tensor([[want[-1]]]), cache=cache,
                  position_ids=torch.tensor([[len(prompt) + i]]), use_cache=True)
        cache = out.past_key_values
        want.append(int(out.logits[0, -1].argmax()))
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=4))
    got = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert got[0].token_ids == want


@pytest.mark.parametrize("variant", ["gemma2", "phi3_longrope"])
def test_engine_greedy_within_the_original_length(tiny_checkpoints, variant):
    # windows of 8 and, for Phi-3, half-rotated heads; prompts up to 47 tokens + 8 < 64
    path = tiny_checkpoints[variant]
    prompts = prompt_set(hf_model(path).config.vocab_size)[:-2]
    want = hf_greedy(hf_model(path), prompts, 8)
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=128, block_size=4,
                                 max_num_batched_tokens=16))
    got = [r.token_ids for r in eng.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0,
                                                                      ignore_eos=True))]
    assert got == want
    assert eng.kv.all_free()


def test_gemma2_soft_caps_change_the_logits(tiny_checkpoints):
    # the tiny checkpoint's caps bind: removing either moves the logits
    ck = load_checkpoint(tiny_checkpoints["gemma2"])
    base = prompt_logits(load_model(ck, torch.float32))
    for field in ("attn_softcap", "final_softcap"):
        cfg = ck.model_config
        uncapped = dataclasses.replace(cfg, options=dataclasses.replace(cfg.options, **{field: 0.0}))
        logits = prompt_logits(load_model(dataclasses.replace(ck, model_config=uncapped), torch.float32))
        assert (logits - base).abs().max() > 0.5, field


def test_phi3_fused_tensor_of_the_wrong_size_names_it(tiny_checkpoints):
    ck = load_checkpoint(tiny_checkpoints["phi3"])
    model = build_model(ck.model_config, torch.float32, "cpu")
    bad = [("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(60, 64))]
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight.*expected 128 rows \(64 \+ 32 \+ 32\)"):
        model.load_weights(bad)


def _logits_with(ck, **options) -> torch.Tensor:
    cfg = ck.model_config
    changed = dataclasses.replace(cfg, options=dataclasses.replace(cfg.options, **options))
    return prompt_logits(load_model(dataclasses.replace(ck, model_config=changed), torch.float32))


def test_each_granite_multiplier_changes_the_logits(tiny_checkpoints):
    # the tiny checkpoint's multipliers are far from 1: setting any back to 1 moves the logits
    ck = load_checkpoint(tiny_checkpoints["granite"])
    base = prompt_logits(load_model(ck, torch.float32))
    for field in ("embed_scale", "residual_scale", "attn_scale", "logits_divisor"):
        assert (_logits_with(ck, **{field: 1.0}) - base).abs().max() > 0.1, field


def test_olmo2_norms_are_where_transformers_puts_them(tiny_checkpoints):
    ck = load_checkpoint(tiny_checkpoints["olmo2"])
    model = load_model(ck, torch.float32)
    layer = model.layers[0]
    assert layer.input_layernorm is None
    assert layer.self_attn.q_norm.weight.shape == (64,) and layer.self_attn.k_norm.weight.shape == (32,)
    names = set(model.weight_slots())
    assert "model.layers.0.post_feedforward_layernorm.weight" in names
    assert not any("input_layernorm" in n for n in names)


def test_gemma3_local_rope_caps_and_smollm3_nope_change_the_logits(tiny_checkpoints):
    # the sliding layer's own RoPE base, the logit cap and the NoPE layer each move the logits
    ck = load_checkpoint(tiny_checkpoints["gemma3"])
    base = prompt_logits(load_model(ck, torch.float32))
    for change in ({"local_rope_theta": ck.model_config.rope_theta}, {"final_softcap": 0.0}):
        assert (_logits_with(ck, **change) - base).abs().max() > 0.1, change
    # the checkpoint's attn_logit_softcapping (2.0) is not applied, as in transformers
    assert ck.config["attn_logit_softcapping"] == 2.0 and ck.model_config.options.attn_softcap == 0.0
    ck = load_checkpoint(tiny_checkpoints["smollm3"])
    assert ck.model_config.options.nope_layers == (1,)
    base = prompt_logits(load_model(ck, torch.float32))
    assert (_logits_with(ck, nope_layers=()) - base).abs().max() > 0.1


def test_olmo2_tensor_parallelism_is_refused_by_head_counts_only(tiny_checkpoints):
    # its all-head q/k norms split (test_tp_engine checks the tokens at TP 2 and 4)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not a multiple"):
        LLMEngine(EngineConfig(model=str(tiny_checkpoints["olmo2"]), num_blocks=16, block_size=4,
                               tensor_parallel_size=3))
