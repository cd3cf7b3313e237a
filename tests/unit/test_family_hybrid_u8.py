"""RecurrentGemma (Griffin's recurrent blocks beside local multi-query
attention): config.json read as transformers' RecurrentGemmaConfig reads it
(its defaults, the released checkpoints' keys), the RG-LRU against
transformers' over prompt chunks that start past position 0, and what is
refused. Token parity through LLMEngine is in test_hybrid_parity."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.models.rg_lru import RecurrentBlock, lru_chunk
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.recurrent_gemma_config import RG_LRU

ARCH = "RecurrentGemmaForCausalLM"
# config.json as google/recurrentgemma-2b writes it (top-level rope keys, a head_dim transformers
# recomputes, keys its config class no longer reads)
RELEASED = {"architectures": [ARCH], "model_type": "recurrent_gemma", "attention_bias": False,
            "attention_window_size": 2048, "block_types": ["recurrent", "recurrent", "attention"],
            "bos_token_id": 2, "conv1d_width": 4, "embeddings_scale_by_sqrt_dim": True, "eos_token_id": 1,
            "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2560,
            "intermediate_size": 15360, "logits_soft_cap": 30.0, "lru_width": 2560, "num_attention_heads": 10,
            "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "vocab_size": 256000}


def reference(raw: dict):
    import transformers

    return transformers.RecurrentGemmaConfig(**{k: v for k, v in raw.items() if k != "architectures"})


@pytest.mark.parametrize("raw", [{"architectures": [ARCH]}, RELEASED], ids=["defaults", "released"])
def test_config_matches_transformers(raw):
    cfg, ref = ModelConfig.from_hf(raw), reference(raw)
    opts = cfg.options
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        ref.num_hidden_layers, ref.hidden_size, ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim,
        ref.vocab_size)
    assert cfg.intermediate_size == ref.intermediate_size // 2  # RecurrentGemmaMlp's width
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.tie_word_embeddings) == (
        ref.rms_norm_eps, ref.rope_parameters["rope_theta"], ref.tie_word_embeddings)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (ref.attention_bias, True, True)
    assert opts.rotary_dim == int(ref.head_dim * ref.rope_parameters["partial_rotary_factor"])
    assert opts.hybrid.layer_kinds == tuple(RG_LRU if t == "linear_attention" else ATTENTION
                                           for t in ref.layers_block_type)
    assert cfg.layer_windows == tuple(ref.attention_window_size if t == "sliding_attention" else 0
                                      for t in ref.layers_block_type)
    assert (opts.rg_lru.lru_width, opts.rg_lru.conv_kernel) == (ref.lru_width, ref.conv1d_width)
    assert opts.final_softcap == ref.logits_soft_cap and opts.norm_plus_one
    # transformers' normalizer is a bfloat16 buffer: sqrt(2560) = 50.596... is 50.5
    assert opts.embed_scale == 50.5 != math.sqrt(ref.hidden_size)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))


@pytest.mark.parametrize("extra, match", [
    ({"block_types": ["recurrent", "mlp"]}, "block_types \\['mlp'\\] are not supported"),
    ({"block_types": ["attention"]}, "leave no recurrent layer"),
    ({"block_types": ["recurrent"]}, "leave no attention layer"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ({"logits_soft_cap": None}, "logits_soft_cap must be positive"),
    ({"attention_window_size": 0}, "attention_window_size must be positive"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
    ({"lru_width": 25}, "lru_width 25 must be a multiple of num_attention_heads"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 RecurrentGemmaForCausalLM checkpoints"),
])
def test_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({"architectures": [ARCH], **extra})


def test_tensor_parallelism_and_lora_are_refused(tiny_checkpoints):
    with pytest.raises(TensorParallelConfigError, match="recurrent blocks are not sharded"):
        check(ModelConfig.from_hf({"architectures": [ARCH]}), 2)
    path = str(tiny_checkpoints["recurrent_gemma"])
    with pytest.raises(Exception, match="LoRA adapters are not supported"):
        LLMEngine(EngineConfig(model=path, num_blocks=32, block_size=4, max_loras=1))


def test_rg_lru_matches_transformers_across_chunks():
    # one sequence's 11 tokens through transformers' RG-LRU at once, and here in chunks of 4, 1
    # and 6 carrying the state: only position 0 enters unnormalised and drops the state
    import transformers
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    raw = {"architectures": [ARCH], "hidden_size": 32, "num_attention_heads": 4, "lru_width": 24}
    ref = RecurrentGemmaRglru(transformers.RecurrentGemmaConfig(**raw))
    block = RecurrentBlock(ModelConfig.from_hf(raw), torch.float32, "cpu", 0)
    gen = torch.Generator().manual_seed(266)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
            getattr(block, name).copy_(p)
        x = torch.randn(1, 11, 24, generator=gen)
        want = ref(x, torch.arange(11)[None])[0]
        h, got = torch.zeros(24), []
        for start, n in ((0, 4), (4, 1), (5, 6)):
            inputs, a = block.gated_inputs(x[0, start:start + n], torch.arange(start, start + n))
            out, h = lru_chunk(inputs, a, h)
            got.append(out)
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=1e-5)
