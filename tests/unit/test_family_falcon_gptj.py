"""config.json parsing of the Falcon and GPT-J families: the defaults
transformers' config classes fill in, older key names, the layer shapes
read, their LoRA stacks, and a clear CheckpointError (or tensor parallel refusal) for
what the engine does not support. Falcon's layouts beyond the parity
variants (sequential, per-head q/k/v; the new architecture on one norm)
are checked against transformers here; the variants' token parity is in
test_model_parity / test_engine_parity."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.helium import deinterleave_heads
from splitserve.engine.models.layers import LayerNorm
from splitserve.engine.models.plain_blocks import ParallelDecoderLayer
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.fixtures.checkpoints import COMMON, hf_model, write_hf_checkpoint
from tests.unit.test_fp8_engine import LOGIT_REL_BOUND
from tests.unit.test_model_parity import ATOL, PROMPT, greedy_tokens, hf_logits, prompt_logits


def falcon(**extra) -> dict:
    return {"architectures": ["FalconForCausalLM"], "vocab_size": 32, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, **extra}


def gptj(**extra) -> dict:
    return {"architectures": ["GPTJForCausalLM"], "vocab_size": 32, "n_embd": 64, "n_layer": 2,
            "n_head": 4, "rotary_dim": 8, **extra}


# --- Falcon -------------------------------------------------------------------

def test_falcon_defaults_are_falcon_7b_shaped():
    cfg = ModelConfig.from_hf(falcon())
    # multi_query and parallel_attn on, one norm, bias off, tied, ffn 4 x hidden, gelu (erf)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (1, 16, 256)
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 10000.0
    assert not (cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias)
    opts = cfg.options
    assert opts.layer_norm and opts.parallel_residual and not opts.parallel_mlp_norm
    assert opts.hidden_act == "gelu" and opts.plain_mlp == ("dense_h_to_4h", "dense_4h_to_h")
    assert cfg.max_position == 2048 and cfg.bos_token_id == 11 and cfg.eos_token_ids == (11,)


@pytest.mark.parametrize("extra, kv, two_norms, parallel", [
    ({"new_decoder_architecture": True, "num_kv_heads": 2}, 2, True, True),
    ({"new_decoder_architecture": True}, 4, True, True),  # num_kv_heads: one per query head
    ({"new_decoder_architecture": True, "num_kv_heads": 1, "num_ln_in_parallel_attn": 1}, 1, False, True),
    ({"multi_query": False}, 4, False, True),
    ({"multi_query": False, "parallel_attn": False}, 4, False, False),
    ({"multi_query": True, "num_kv_heads": 2, "parallel_attn": False}, 1, False, False),
])
def test_falcon_layer_shapes(extra, kv, two_norms, parallel):
    cfg = ModelConfig.from_hf(falcon(**extra))
    assert cfg.num_kv_heads == kv
    assert (cfg.options.parallel_mlp_norm, cfg.options.parallel_residual) == (two_norms, parallel)


def test_falcon_older_key_names_and_options():
    cfg = ModelConfig.from_hf({"architectures": ["FalconForCausalLM"], "vocab_size": 32, "n_embed": 64,
                               "n_head": 4, "n_layer": 3, "bias": True, "ffn_hidden_size": 96,
                               "layer_norm_epsilon": 1e-3, "tie_word_embeddings": False,
                               "activation": "relu", "rope_theta": 500.0})
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.intermediate_size) == (64, 4, 3, 96)
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias
    assert cfg.rms_norm_eps == 1e-3 and not cfg.tie_word_embeddings and cfg.rope_theta == 500.0
    assert cfg.options.hidden_act == "relu"


@pytest.mark.parametrize("extra, match", [
    ({"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn false is not supported"),
    ({"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn 2 without new_decoder_architecture"),
    ({"num_ln_in_parallel_attn": 3, "new_decoder_architecture": True}, "must be 1 or 2"),
    ({"multi_query": False, "num_kv_heads": 2}, r"num_kv_heads \(2\) must equal"),
    ({"activation": "swiglu"}, "activation 'swiglu' is not supported for falcon"),
    ({"num_attention_heads": 5}, r"hidden_size \(64\) must be a multiple of num_attention_heads"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 falcon checkpoints are not supported"),
])
def test_falcon_refusals_name_the_option(extra, match):
    with pytest.raises(CheckpointError, match=f"config.json: .*{match}"):
        ModelConfig.from_hf(falcon(**extra))


# the layouts the parity variants leave out, checked against transformers' logits
FALCON_LAYOUTS = {
    # the original decoder: sequential attention then MLP (two norms), q/k/v per head, biases
    "sequential": ({"multi_query": False, "parallel_attn": False, "bias": True}, 50),
    # the new architecture with one KV head and one norm for the parallel attention and MLP
    "new_one_norm": ({"new_decoder_architecture": True, "num_kv_heads": 1,
                      "num_ln_in_parallel_attn": 1}, 51),
}


@pytest.mark.parametrize("layout", FALCON_LAYOUTS)
def test_falcon_layouts_match_transformers(tmp_path, tiny_tokenizer_dir, layout):
    extra, seed = FALCON_LAYOUTS[layout]
    common = {k: v for k, v in COMMON.items() if k not in ("head_dim", "num_key_value_heads")}
    path = write_hf_checkpoint(tmp_path / layout, "FalconConfig", {**common, "vocab_size": 512, **extra},
                               seed, {}, tiny_tokenizer_dir)
    ours, ref = load_model(load_checkpoint(path), torch.float32), hf_model(path)
    torch.testing.assert_close(prompt_logits(ours), hf_logits(ref, PROMPT), atol=ATOL, rtol=0)
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=2)[0, len(PROMPT):].tolist()
    assert greedy_tokens(ours, 6) == want  # decode steps through the paged cache


def test_falcon_loads_two_norms_and_takes_lora(parity_models):
    model, _ = parity_models("falcon")  # ln_attn / ln_mlp loaded as the parallel layer's two norms
    layer = model.layers[0]
    assert isinstance(layer, ParallelDecoderLayer)
    assert isinstance(layer.input_layernorm, LayerNorm) and isinstance(layer.post_attention_layernorm,
                                                                       LayerNorm)
    mq, _ = parity_models("falcon_mq")
    assert mq.layers[0].post_attention_layernorm is None and mq.lm_head is None
    assert mq.layers[0].self_attn.num_kv_heads == 1
    # query_key_value's q/k/v parts, dense as o_proj (PEFT parity: test_lora_engine)
    assert {name for _, name in model.enable_lora(2, 4)} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                             "dense_h_to_4h", "dense_4h_to_h"}


# --- GPT-J ----------------------------------------------------------------------

def test_gptj_defaults_and_options():
    cfg = ModelConfig.from_hf(gptj(rope_theta=500.0))  # GPT-J's RoPE base is always 10000
    shape = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    assert shape == (64, 2, 4, 4, 16)
    assert cfg.intermediate_size == 256 and cfg.max_position == 2048 and cfg.rope_theta == 10000.0
    assert not (cfg.attention_bias or cfg.o_proj_bias) and cfg.mlp_bias and not cfg.tie_word_embeddings
    opts = cfg.options
    assert opts.rotary_dim == 8 and opts.interleaved_rope and opts.lm_head_bias
    assert opts.parallel_residual and not opts.parallel_mlp_norm and opts.hidden_act == "gelu_tanh"
    assert cfg.bos_token_id == 50256
    whole = ModelConfig.from_hf(gptj(rotary_dim=16, n_inner=96, n_positions=128))
    assert whole.options.rotary_dim is None and whole.intermediate_size == 96 and whole.max_position == 128
    unset = gptj(n_embd=256)
    del unset["rotary_dim"]  # transformers' default 64: all of each 64-wide head
    assert ModelConfig.from_hf(unset).options.rotary_dim is None


@pytest.mark.parametrize("extra, match", [
    ({"rotary_dim": None}, "rotary_dim None is not supported for gptj"),
    ({"rotary_dim": 7}, "rotary_dim 7 is not supported"),
    ({"rotary_dim": 32}, r"rotary_dim 32 is not supported .* head_dim = 16"),
    ({"activation_function": "swish_glu"}, "activation_function 'swish_glu' is not supported"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 gptj checkpoints are not supported"),
])
def test_gptj_refusals_name_the_option(extra, match):
    with pytest.raises(CheckpointError, match=f"config.json: .*{match}"):
        ModelConfig.from_hf(gptj(**extra))


def test_partial_deinterleave_turns_pairwise_rotation_into_rotate_half():
    # GPT-J's rotation of a head's first r dims (adjacent pairs), the rest passed through,
    # equals the rotate-half rotation of the reordered head's first r dims, reordered
    d, r, theta = 12, 8, 0.7
    x = torch.randn(2 * d)  # two heads
    freqs = theta * torch.arange(r // 2, dtype=torch.float)
    cos, sin = freqs.cos().repeat_interleave(2), freqs.sin().repeat_interleave(2)
    want = x.view(2, d).clone()
    rot = want[:, :r]
    want[:, :r] = rot * cos + torch.stack((-rot[:, 1::2], rot[:, 0::2]), dim=-1).flatten(1) * sin
    y = deinterleave_heads(x, d, r).view(2, d).clone()
    half = y[:, :r]
    y[:, :r] = half * freqs.cos().repeat(2) + torch.cat((-half[:, r // 2:], half[:, :r // 2]), -1) * \
        freqs.sin().repeat(2)
    assert torch.equal(y[:, r:], want[:, r:])  # the passed dims stay where they were
    torch.testing.assert_close(y, deinterleave_heads(want.flatten(), d, r).view(2, d))


def test_gptj_reorders_its_adapters_q_k_rows(parity_models):
    model, _ = parity_models("gptj")
    assert {name for _, name in model.enable_lora(2, 4)} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                             "fc_in", "fc_out"}
    b = torch.randn(model.cfg.num_heads * model.cfg.head_dim, 3)
    d, r = model.cfg.head_dim, model.cfg.options.rotary_dim
    for name in ("q_proj", "k_proj"):  # as the weights' rows at load (PEFT parity: test_lora_engine)
        torch.testing.assert_close(model.adapter_rows(name, b), deinterleave_heads(b, d, r))
    assert model.adapter_rows("v_proj", b) is b


# --- both -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [falcon(new_decoder_architecture=True, num_kv_heads=2), gptj()])
def test_tensor_parallel_splits_by_heads(cfg):
    check(ModelConfig.from_hf(cfg), 2)
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(\d+\) is not a multiple"):
        check(ModelConfig.from_hf(cfg), 3)


@pytest.mark.parametrize("variant", ["falcon", "gptj", "bloom", "mpt"])
def test_weight_dtype_fp8_quantizes_at_load(tiny_checkpoints, parity_models, variant):
    # the projections of the split / reordered tensors (Bloom's and MPT's too), quantized once
    # loaded
    model = load_model(load_checkpoint(tiny_checkpoints[variant]), torch.float32, weight_dtype="fp8")
    attn = model.layers[0].self_attn
    assert attn.qkv_proj.weight.dtype == torch.float8_e4m3fn == model.layers[0].mlp.up_proj.weight.dtype
    full, _ = parity_models(variant)
    logits, ref = prompt_logits(model), prompt_logits(full)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < LOGIT_REL_BOUND
