"""GPT-BigCode and GPT-Neo: config.json translation (their own key names
and transformers' defaults), the options they refuse, GPT-Neo's older
exports' mask buffers, and its window's exact width. Token parity of the
variants is in test_model_parity / test_engine_parity, the live hand-off
in tests/integration/test_family_handoff.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.models import build_model
from tests.unit.test_model_parity import ATOL, PROMPT, hf_logits, prompt_logits


def bigcode_raw(**extra) -> dict:  # as GPTBigCodeConfig writes it
    return {"architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode", "vocab_size": 32,
            "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, **extra}


def neo_raw(**extra) -> dict:  # as GPTNeoConfig writes it
    return {"architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo", "vocab_size": 32,
            "hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 128,
            "attention_types": [[["global", "local"], 1]], **extra}


def test_gpt_bigcode_config_keys_and_defaults():
    cfg = ModelConfig.from_hf(bigcode_raw(num_key_value_heads=2, head_dim=8))  # stray Llama keys
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == ("gpt_bigcode", 64, 2, 4)
    # multi_query by default: one KV head, hidden / heads wide; n_inner None: 4 x n_embd
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (1, 16, 256)
    assert (cfg.max_position, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (128, 1e-5, True)
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (50256, (50256,))
    assert cfg.layer_windows == (0, 0)
    opts = cfg.options
    assert (opts.hidden_act, opts.layer_norm, opts.plain_mlp) == ("gelu_tanh", True, ("c_fc", "c_proj"))
    assert (opts.position_table, opts.attn_scale) == ("model.embed_positions", None)
    # the softmax switches change nothing in float32: accepted
    cfg = ModelConfig.from_hf(bigcode_raw(multi_query=False, scale_attn_weights=False, n_inner=96,
                                          attention_softmax_in_fp32=False,
                                          scale_attention_softmax_in_fp32=False,
                                          activation_function="gelu", tie_word_embeddings=False))
    assert (cfg.num_kv_heads, cfg.intermediate_size, cfg.options.attn_scale) == (4, 96, 1.0)
    assert cfg.options.hidden_act == "gelu" and not cfg.tie_word_embeddings


def test_gpt_neo_config_keys_and_defaults():
    cfg = ModelConfig.from_hf(neo_raw(num_key_value_heads=2, head_dim=8, window_size=8))
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == ("gpt_neo", 64, 2, 4)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (4, 16, 256)
    assert (cfg.max_position, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (128, 1e-5, True)
    # q/k/v unbiased, out_proj and the MLP biased
    assert not cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (50256, (50256,))
    assert (cfg.layer_windows, cfg.sliding_window) == ((0, 8), 8)
    opts = cfg.options
    assert (opts.hidden_act, opts.layer_norm, opts.plain_mlp) == ("gelu_tanh", True, ("c_fc", "c_proj"))
    assert (opts.position_table, opts.attn_scale) == ("model.embed_positions", 1.0)
    # transformers' defaults: 24 layers alternating global and local, a window of 256
    cfg = ModelConfig.from_hf({**neo_raw(num_layers=24), "attention_types": None})
    assert cfg.layer_windows == (0, 256) * 12
    cfg = ModelConfig.from_hf(neo_raw(attention_types=[[["global"], 2]], window_size=0,
                                      intermediate_size=96, layer_norm_epsilon=1e-3))
    assert (cfg.layer_windows, cfg.sliding_window) == ((0, 0), None)
    assert (cfg.intermediate_size, cfg.rms_norm_eps) == (96, 1e-3)
    # config.json's attention_layers (what save_pretrained writes beside attention_types)
    # wins over the expansion, as GPTNeoConfig sets it last
    cfg = ModelConfig.from_hf(neo_raw(attention_layers=["local", "global"], window_size=4))
    assert cfg.layer_windows == (4, 0)


QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}


@pytest.mark.parametrize("raw, match", [
    (bigcode_raw(add_cross_attention=True), "add_cross_attention"),
    (bigcode_raw(activation_function="quick_gelu"), "activation_function 'quick_gelu'"),
    (bigcode_raw(quantization_config=QUANT), "fp8 GPT-BigCode checkpoints are not supported"),
    (bigcode_raw(n_head=5), r"n_embd \(64\) must be a multiple of n_head \(5\)"),
    (neo_raw(attention_types=[[["global", "sparse"], 1]]), r"attention_types \['sparse'\]"),
    (neo_raw(attention_types=[[["global", "local"], 2]]), "give 4 layers for num_layers 2"),
    (neo_raw(attention_types=None), "give 24 layers for num_layers 2"),
    (neo_raw(attention_layers=["global"]), "give 1 layers for num_layers 2"),
    (neo_raw(attention_types=[["global", "local"]]), "list of \\[\\[kinds...\\], repeats\\] pairs"),
    (neo_raw(window_size=0), "window_size must be positive"),
    (neo_raw(activation_function="quick_gelu"), "activation_function 'quick_gelu'"),
    (neo_raw(quantization_config=QUANT), "fp8 GPT-Neo checkpoints are not supported"),
    (neo_raw(num_heads=5), r"hidden_size \(64\) must be a multiple of num_heads \(5\)"),
])
def test_unsupported_options_are_refused(raw, match):
    with pytest.raises(CheckpointError, match=match) as e:
        ModelConfig.from_hf(raw)
    assert str(e.value).startswith("config.json")


def test_gpt_neo_mask_buffers_of_older_exports_are_skipped(parity_models, tiny_checkpoints):
    # EleutherAI's exports store each attention's causal mask (bias) and masked_bias
    model, _ = parity_models("gpt_neo")
    ck = load_checkpoint(tiny_checkpoints["gpt_neo"])
    tensors = {k: v for f in ck.weight_files for k, v in load_file(f).items()}
    for i in range(2):
        tensors[f"transformer.h.{i}.attn.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
        tensors[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    old = build_model(ck.model_config, torch.float32, "cpu")
    old.load_weights(tensors.items())
    for (name, p), (name2, q) in zip(model.named_parameters(), old.named_parameters()):
        assert name == name2 and torch.equal(p, q), name


def test_gpt_neo_window_width_binds(parity_models):
    # the local layer sees window_size tokens, its own included: one more or one fewer
    # moves the logits of the prompt's tokens past the window well past the tolerance
    model, ref = parity_models("gpt_neo")
    attn = model.layers[1].self_attn
    want = hf_logits(ref, PROMPT)
    assert attn.sliding_window == 8 and len(PROMPT) > 8
    try:
        for width in (7, 9):
            attn.sliding_window = width
            assert (prompt_logits(model) - want).abs().max() > 100 * ATOL
    finally:
        attn.sliding_window = 8
    torch.testing.assert_close(prompt_logits(model), want, atol=ATOL, rtol=0)
