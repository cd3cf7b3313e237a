"""LFM2 (lfm2), LFM2-MoE (lfm2_moe) and LFM3 (lfm3): the config.json
defaults as their config classes give them, the layer pattern, MLP width
and RoPE derived as transformers derives them, and what is refused
(options, fp8 checkpoints, tensor parallelism); LFM3 without sandwich norms
or head gates against transformers. Token parity is in test_hybrid_parity
(variants lfm2, lfm2_moe, lfm3)."""

from __future__ import annotations

import pytest
import torch
import transformers

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.lfm2_config import SHORT_CONV
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model

LFM2 = "Lfm2ForCausalLM"
LFM2_MOE = "Lfm2MoeForCausalLM"
LFM3 = "Lfm3ForCausalLM"


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], **extra}


def hf_mlp_width(config_cls: str, mlp_cls, **kwargs) -> int:
    """The MLP width transformers builds for a config (on the meta device)."""
    config = getattr(transformers, config_cls)(**kwargs)
    with torch.device("meta"):
        return mlp_cls(config).w1.out_features


def test_lfm2_defaults():
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    ref = transformers.Lfm2Config()
    cfg = ModelConfig.from_hf(raw(LFM2))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) \
        == (ref.vocab_size, ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads,
            ref.num_key_value_heads, ref.hidden_size // ref.num_attention_heads)
    assert cfg.intermediate_size == hf_mlp_width("Lfm2Config", Lfm2MLP) == 8192
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (ref.norm_eps, 1e6)
    assert cfg.max_position == ref.max_position_embeddings and cfg.tie_word_embeddings and cfg.qk_norm
    assert not (cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    # every layer attends by default (full_attn_idxs absent): no state, the plain decoder
    assert cfg.options.hybrid is None and cfg.num_cache_layers == 32
    assert (cfg.options.lfm2.conv_kernel, cfg.options.lfm2.conv_bias) == (3, False)


def test_lfm2_layer_pattern():
    cfg = ModelConfig.from_hf(raw(LFM2, num_hidden_layers=5, full_attn_idxs=[1, 4], conv_L_cache=4))
    ref = transformers.Lfm2Config(num_hidden_layers=5, full_attn_idxs=[1, 4]).layer_types
    kinds = cfg.options.hybrid.layer_kinds
    assert kinds == tuple(ATTENTION if t == "full_attention" else SHORT_CONV for t in ref)
    assert cfg.num_cache_layers == 2 and cfg.options.hybrid.states[0].shape == (2560, 3)
    # layer_types wins over full_attn_idxs
    cfg = ModelConfig.from_hf(raw(LFM2, num_hidden_layers=2, full_attn_idxs=[0],
                                  layer_types=["conv", "full_attention"]))
    assert cfg.options.hybrid.layer_kinds == (SHORT_CONV, ATTENTION)


@pytest.mark.parametrize("extra", [
    {"block_ffn_dim_multiplier": 0.7},
    {"block_auto_adjust_ff_dim": False},
    {"intermediate_size": 1000, "block_ffn_dim_multiplier": 1.3, "block_multiple_of": 96},
])
def test_lfm2_mlp_width_matches_transformers(extra):
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    cfg = ModelConfig.from_hf(raw(LFM2, hidden_size=64, **extra))
    assert cfg.intermediate_size == hf_mlp_width("Lfm2Config", Lfm2MLP, hidden_size=64, **extra)


def test_lfm2_older_key_names():
    # block_ff_dim and tie_embedding, popped by Lfm2Config over intermediate_size / tie_word_embeddings
    cfg = ModelConfig.from_hf(raw(LFM2, block_ff_dim=1536, intermediate_size=999, tie_embedding=False,
                                  tie_word_embeddings=True, block_auto_adjust_ff_dim=False))
    assert cfg.intermediate_size == 1536 and not cfg.tie_word_embeddings
    # a null multiplier (Lfm2MLP's test; Lfm2Config itself takes none): 2/3 of the width, unrounded
    assert ModelConfig.from_hf(raw(LFM2, intermediate_size=1000,
                                   block_ffn_dim_multiplier=None)).intermediate_size == 666


@pytest.mark.parametrize("extra, match", [
    ({"conv_L_cache": 1}, "conv_L_cache"),
    ({"num_hidden_layers": 2, "layer_types": ["conv", "sliding_attention"]}, "layer_types"),
    ({"num_hidden_layers": 2, "layer_types": ["conv"]}, "layer_types has 1 entries"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 Lfm2ForCausalLM"),
])
def test_lfm2_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(LFM2, **extra))


def test_lfm2_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="short convolution"):
        check(ModelConfig.from_hf(raw(LFM2, num_hidden_layers=2, full_attn_idxs=[1])), 2)


@pytest.mark.parametrize("variant", ["lfm2", "lfm2_moe"])
def test_lora_is_refused(tiny_checkpoints, variant):
    path = str(tiny_checkpoints[variant])
    with pytest.raises(Exception, match="LoRA adapters are not supported"):
        LLMEngine(EngineConfig(model=path, num_blocks=32, block_size=4, max_loras=1))


def test_lfm2_moe_defaults():
    ref = transformers.Lfm2MoeConfig()
    types = ["conv", "full_attention", "conv", "conv"]
    cfg = ModelConfig.from_hf(raw(LFM2_MOE, num_hidden_layers=4, layer_types=types))
    moe = cfg.moe
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) \
        == (ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_attention_heads,
            ref.num_key_value_heads)
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.routed_scaling_factor) \
        == (ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size, ref.routed_scaling_factor)
    assert moe.renormalize == ref.norm_topk_prob and moe.shared_expert_intermediate_size == 0
    assert moe.sparse_layers == (False, False, True, True)  # num_dense_layers 2
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (ref.norm_eps, 1e6) and cfg.tie_word_embeddings
    opts = cfg.options
    assert opts.lfm2.expert_bias == ref.use_expert_bias and opts.lfm2.conv_kernel == ref.conv_L_cache
    assert opts.hybrid.layer_kinds == (SHORT_CONV, ATTENTION, SHORT_CONV, SHORT_CONV)
    cfg = ModelConfig.from_hf(raw(LFM2_MOE, num_hidden_layers=4, layer_types=types, num_dense_layers=0,
                                  use_expert_bias=False, norm_topk_prob=False))
    assert all(cfg.moe.sparse_layers) and not cfg.moe.renormalize and not cfg.options.lfm2.expert_bias
    # Lfm2MoeConfig pops tie_embedding as LFM2's does
    cfg = ModelConfig.from_hf(raw(LFM2_MOE, num_hidden_layers=4, layer_types=types, tie_embedding=False))
    assert cfg.tie_word_embeddings == transformers.Lfm2MoeConfig(tie_embedding=False).tie_word_embeddings


@pytest.mark.parametrize("extra, match", [
    ({}, "layer_types is required"),
    ({"layer_types": ["conv", "linear_attention"]}, "layer_types"),
    ({"layer_types": ["conv", "conv"], "num_experts_per_tok": 40}, "num_experts_per_tok"),
    ({"layer_types": ["conv", "conv"], "quantization_config": {"quant_method": "fp8"}},
     "fp8 Lfm2MoeForCausalLM"),
])
def test_lfm2_moe_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(LFM2_MOE, num_hidden_layers=2, **extra))


def test_lfm2_moe_tensor_parallel_is_refused():
    cfg = ModelConfig.from_hf(raw(LFM2_MOE, num_hidden_layers=2, layer_types=["conv", "full_attention"]))
    with pytest.raises(TensorParallelConfigError, match="short convolution"):
        check(cfg, 2)


def test_lfm3_defaults():
    ref = transformers.Lfm3Config()
    cfg = ModelConfig.from_hf(raw(LFM3))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim) == (ref.vocab_size, ref.hidden_size, ref.intermediate_size,
                                                ref.num_hidden_layers, ref.num_attention_heads,
                                                ref.num_key_value_heads, ref.head_dim)
    assert (cfg.rms_norm_eps, cfg.bos_token_id, cfg.eos_token_ids) == (ref.norm_eps, ref.bos_token_id,
                                                                        (ref.eos_token_id,))
    assert cfg.tie_word_embeddings and cfg.qk_norm and not (cfg.attention_bias or cfg.o_proj_bias)
    opts = cfg.options
    kinds = tuple(SHORT_CONV if t == "conv" else ATTENTION for t in ref.layer_types)
    assert opts.hybrid.layer_kinds == kinds and opts.sandwich_norms and opts.lfm2.attention_gate
    assert cfg.layer_windows == tuple(256 if t == "sliding_attention" else 0 for t in ref.layer_types)
    assert opts.lfm2.conv_kernel == ref.conv_L_cache == 7
    # the sliding layers rotate every dim with base 1e4; the full ones half of them with 1e6
    sliding, full = opts.lfm2.ropes[4], opts.lfm2.ropes[2]
    assert (sliding.theta, sliding.angles, full.theta, full.angles) == (1e4, 64, 1e6, 32)
    assert opts.lfm2.ropes[0] is None
    # Lfm3Config reads no tie_embedding (LFM2's older name)
    assert ModelConfig.from_hf(raw(LFM3, tie_embedding=False)).tie_word_embeddings \
        == transformers.Lfm3Config(tie_embedding=False).tie_word_embeddings


@pytest.mark.parametrize("extra, match", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "nested by layer type"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "yarn"),
    ({"sliding_window": None, "layer_types": ["conv", "sliding_attention", "full_attention", "conv"]},
     "sliding_window is null"),
    ({"layer_types": ["conv", "linear_attention", "conv", "conv"]}, "layer_types"),
    ({"conv_L_cache": 1}, "conv_L_cache"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 Lfm3ForCausalLM"),
])
def test_lfm3_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(LFM3, num_hidden_layers=4, **extra))


def test_lfm3_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="short convolution"):
        check(ModelConfig.from_hf(raw(LFM3, num_hidden_layers=4)), 2)


def test_lfm3_without_sandwich_norms_or_gates_matches_transformers(tiny_checkpoints):
    path = tiny_checkpoints["lfm3_plain"]
    prompts = [list(range(20, 37)), [5, 9, 13]]
    want = hf_greedy(hf_model(path), prompts, 5)
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=32, block_size=4, max_num_batched_tokens=8))
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
