"""ALiBi and the Bloom, MPT and Falcon-alibi families: the slopes against
transformers' own formulas, config.json parsing (the defaults transformers'
config classes fill in, older key names, what is read and what is refused,
naming the option), the Bloom names a bare BloomModel export uses, fp8
weights quantized at load, and the LoRA stacks and tensor-parallel
splits (MPT's per-rank slopes). Layouts beyond the parity variants
(Bloom's residual after the norm, Falcon-RW's) are checked against
transformers here; the variants' token parity is in test_model_parity /
test_engine_parity, the kernels' bias in test_triton_attention /
test_cpu_attention."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.alibi import alibi_slopes, family_alibi_slopes, shard_alibi_slopes
from splitserve.engine.models.bloom import NormedResidualLayer
from splitserve.engine.models.mpt import MptCausalLM
from splitserve.engine.parallel.plan import ShardPlan, TensorParallelConfigError, check
from tests.fixtures.checkpoints import COMMON, hf_model, write_hf_checkpoint
from tests.unit.test_model_parity import ATOL, PROMPT, greedy_tokens, hf_logits, prompt_logits


def bloom(**extra) -> dict:
    return {"architectures": ["BloomForCausalLM"], "vocab_size": 32, "hidden_size": 64, "n_layer": 2,
            "n_head": 4, **extra}


def mpt(attn_config: dict | None = None, **extra) -> dict:
    return {"architectures": ["MptForCausalLM"], "vocab_size": 32, "d_model": 64, "n_layers": 2,
            "n_heads": 4, "attn_config": attn_config or {}, **extra}


def falcon(**extra) -> dict:
    return {"architectures": ["FalconForCausalLM"], "vocab_size": 32, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "alibi": True, **extra}


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 40, 71, 112])
def test_slopes_match_bloom_and_mpt(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    slopes = alibi_slopes(heads)
    assert slopes.dtype == torch.float32 and torch.equal(slopes, _get_alibi_slopes(heads, "cpu"))
    mpt_slopes = -build_mpt_alibi_tensor(heads, 2)[:, 0, 0]  # its bias at key distance -1
    torch.testing.assert_close(slopes, mpt_slopes, rtol=1e-6, atol=0)


# --- Bloom ------------------------------------------------------------------------

def test_bloom_defaults_and_older_keys():
    cfg = ModelConfig.from_hf(bloom())
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (4, 16, 256)
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias and cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_position == 2048
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    opts = cfg.options
    assert opts.alibi == "bloom" and opts.layer_norm and opts.hidden_act == "gelu_tanh"
    assert opts.plain_mlp == ("dense_h_to_4h", "dense_4h_to_h") and not opts.parallel_residual
    old = bloom(n_embed=96, seq_length=512, layer_norm_epsilon=1e-3, pretraining_tp=4)
    del old["hidden_size"]
    cfg = ModelConfig.from_hf(old)  # pretraining_tp alone changes nothing
    assert (cfg.hidden_size, cfg.max_position, cfg.rms_norm_eps) == (96, 512, 1e-3)


@pytest.mark.parametrize("extra, match", [
    ({"slow_but_exact": True, "pretraining_tp": 2}, "slow_but_exact with pretraining_tp > 1"),
    ({"n_head": 5}, r"hidden_size \(64\) must be a multiple of n_head \(5\)"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 bloom checkpoints are not supported"),
])
def test_bloom_refusals_name_the_option(extra, match):
    with pytest.raises(CheckpointError, match=f"config.json: .*{match}"):
        ModelConfig.from_hf(bloom(**extra))


def test_bloom_reads_bare_model_names_and_takes_lora(parity_models):
    model, _ = parity_models("bloom")
    assert model.cos_sin_cache is None  # ALiBi: no RoPE table
    attn = model.layers[0].self_attn
    assert torch.equal(attn.alibi_slopes, alibi_slopes(3))
    named = dict(model.mapped("word_embeddings_layernorm.bias", torch.zeros(48)))
    assert list(named) == ["model.embed_layernorm.bias"]
    assert list(dict(model.mapped("h.1.self_attention.dense.weight", torch.zeros(1)))) == \
        ["model.layers.1.self_attn.o_proj.weight"]
    # query_key_value's per-head q/k/v parts, dense as o_proj (PEFT parity: test_lora_engine)
    assert {name for _, name in model.enable_lora(2, 4)} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                             "dense_h_to_4h", "dense_4h_to_h"}


# --- MPT --------------------------------------------------------------------------

def test_mpt_defaults_and_options():
    cfg = ModelConfig.from_hf(mpt())
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.max_position) == (4, 16, 256, 2048)
    assert not (cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias) and cfg.tie_word_embeddings
    assert cfg.bos_token_id is None and cfg.eos_token_ids == () and cfg.vocab_size == 32
    opts = cfg.options
    assert opts.alibi == "bloom" and opts.float_layer_norm == "weight" and opts.hidden_act == "gelu"
    assert opts.plain_mlp == ("up_proj", "down_proj") and opts.attn_scale is None and opts.clip_qkv is None
    # what transformers reads of attn_config, and what it ignores
    cfg = ModelConfig.from_hf(mpt({"softmax_scale": 0.1, "clip_qkv": 6, "alibi": True, "alibi_bias_max": 8,
                                   "attn_uses_sequence_id": True, "attn_impl": "triton"},
                                  max_seq_len=4096, learned_pos_emb=True, no_bias=True, expansion_ratio=4))
    assert (cfg.options.attn_scale, cfg.options.clip_qkv, cfg.max_position) == (0.1, 6.0, 4096)
    assert ModelConfig.from_hf(mpt({"clip_qkv": 0})).options.clip_qkv is None  # falsy: no clamp


@pytest.mark.parametrize("attn, extra, match", [
    ({"alibi": False}, {}, "attn_config.alibi False"),
    ({"alibi_bias_max": 16}, {}, "attn_config.alibi_bias_max 16"),
    ({"attn_type": "multiquery_attention"}, {}, "attn_config.attn_type 'multiquery_attention'"),
    ({"qk_ln": True}, {}, "attn_config.qk_ln True"),
    ({"prefix_lm": True}, {}, "attn_config.prefix_lm True"),
    ({"rope": True}, {}, "attn_config.rope True"),
    ({"sliding_window_size": 128}, {}, "attn_config.sliding_window_size 128"),
    ({}, {"no_bias": False}, "no_bias false"),
    ({}, {"expansion_ratio": 2}, "expansion_ratio 2"),
    ({}, {"logit_scale": "inv_sqrt_d_model"}, "logit_scale 'inv_sqrt_d_model'"),
    ({}, {"quantization_config": {"quant_method": "fp8"}}, "fp8 mpt checkpoints are not supported"),
])
def test_mpt_refusals_name_the_option(attn, extra, match):
    with pytest.raises(CheckpointError, match=f"config.json: .*{match}"):
        ModelConfig.from_hf(mpt(attn, **extra))


def test_mpt_takes_lora(parity_models):
    model, _ = parity_models("mpt")
    assert model.cos_sin_cache is None and model.layers[0].self_attn.clip_qkv == 1.2
    # Wqkv's q/k/v parts, out_proj as o_proj (PEFT parity: test_lora_engine)
    assert {name for _, name in model.enable_lora(2, 4)} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                             "up_proj", "down_proj"}


# --- Falcon with alibi --------------------------------------------------------------

def test_falcon_alibi_slopes_are_scaled_bfloat16():
    cfg = ModelConfig.from_hf(falcon(num_attention_heads=16))
    assert cfg.options.alibi == "falcon"
    want = alibi_slopes(16).bfloat16().float() / 2.0  # head_dim 4
    assert torch.equal(family_alibi_slopes(cfg, "cpu"), want)
    assert not torch.equal(want * 2.0, alibi_slopes(16))  # 2 ** -0.5 and its powers round
    assert ModelConfig.from_hf(falcon(alibi=False)).options.alibi == ""


@pytest.mark.parametrize("cfg", [bloom(), falcon(new_decoder_architecture=True, num_kv_heads=2)])
def test_tensor_parallel_splits_the_layer_norm_families_by_their_heads(cfg):
    check(ModelConfig.from_hf(cfg), 2)
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(4\) is not a multiple"):
        check(ModelConfig.from_hf(cfg), 8)


def test_tensor_parallel_ranks_take_their_heads_slopes():
    # MPT splits as Llama does (its norms are whole on every rank); rank r's attention holds
    # the slopes of its own query heads (TP=2 token parity: test_tp_engine, slow)
    cfg = ModelConfig.from_hf(mpt(n_heads=8, d_model=128))
    for rank in (0, 1):
        plan = ShardPlan(cfg, 2, rank)
        model = MptCausalLM(plan.local_config(), torch.float32, "cpu")
        shard_alibi_slopes(model.layers, plan)
        for layer in model.layers:
            assert torch.equal(layer.self_attn.alibi_slopes, alibi_slopes(8)[4 * rank:4 * rank + 4])


# layouts the parity variants leave out: (config class, its kwargs, seed)
LAYOUTS = {
    # Bloom whose blocks add their outputs to their normed inputs
    "bloom_normed_residual": ("BloomConfig", {"apply_residual_connection_post_layernorm": True}, 120),
    # Falcon-RW's: q/k/v per head, attention then MLP on two norms, biases; 8 heads
    "falcon_rw": ("FalconConfig", {"alibi": True, "multi_query": False, "parallel_attn": False,
                                   "bias": True, "num_attention_heads": 8}, 122),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_transformers(tmp_path, tiny_tokenizer_dir, layout):
    config_cls, extra, seed = LAYOUTS[layout]
    common = {k: v for k, v in COMMON.items()
              if not (config_cls == "FalconConfig" and k in ("head_dim", "num_key_value_heads"))}
    path = write_hf_checkpoint(tmp_path / layout, config_cls, {**common, "vocab_size": 512, **extra},
                               seed, {}, tiny_tokenizer_dir)
    ours, ref = load_model(load_checkpoint(path), torch.float32), hf_model(path)
    if layout == "bloom_normed_residual":
        assert isinstance(ours.layers[1], NormedResidualLayer)
    torch.testing.assert_close(prompt_logits(ours), hf_logits(ref, PROMPT), atol=ATOL, rtol=0)
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=2)[0, len(PROMPT):].tolist()
    assert greedy_tokens(ours, 6) == want  # decode steps through the paged cache
