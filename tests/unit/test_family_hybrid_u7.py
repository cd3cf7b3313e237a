"""MiniMax-Text-01 (lightning attention beside softmax attention, experts
in every layer): config.json read as transformers' MiniMaxConfig reads it,
the lightning layers' decay rates and chunked form against the
token-by-token rule, and what is refused. Token parity through LLMEngine
is in test_hybrid_parity."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.models.lightning import BLOCK, LightningAttention, slope_rates
from splitserve.engine.parallel.plan import TensorParallelConfigError, check

MINIMAX = "MiniMaxForCausalLM"


def test_minimax_config_matches_transformers():
    import transformers

    raw = {"architectures": [MINIMAX], "num_hidden_layers": 5, "mlp_beta_factor": 0.5}
    cfg = ModelConfig.from_hf(raw)
    ref = transformers.MiniMaxConfig(num_hidden_layers=5, mlp_beta_factor=0.5)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        ref.hidden_size, ref.num_attention_heads, ref.num_key_value_heads,
        ref.hidden_size // ref.num_attention_heads, ref.vocab_size)
    assert cfg.rms_norm_eps == ref.rms_norm_eps and not cfg.tie_word_embeddings
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 1e6
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_intermediate_size, cfg.moe.renormalize) == (
        ref.num_local_experts, ref.num_experts_per_tok, ref.intermediate_size, True)
    assert all(cfg.moe.sparse_layers)
    assert cfg.options.hybrid.layer_kinds == tuple(
        ATTENTION if t == "full_attention" else "lightning_attention" for t in ref.layer_types)
    assert cfg.options.residual_factors == ((1.0, 1.0), (1.0, 1.0), (1.0, 0.5))
    assert cfg.options.hybrid.states[0].shape == (32, 128, 128)


def test_minimax_slope_rates_match_transformers():
    import transformers
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    ref_cfg = transformers.MiniMaxConfig(num_hidden_layers=6, num_attention_heads=8, hidden_size=64)
    for layer in (1, 5):
        ref = MiniMaxLightningAttention(ref_cfg, layer).get_slope_rate()[:, 0, 0]
        torch.testing.assert_close(slope_rates(8, layer, 6), ref, atol=0, rtol=0)


def test_minimax_chunked_lightning_matches_token_by_token():
    # a chunk over two blocks from a nonzero state, each head decaying at its own rate
    cfg = ModelConfig.from_hf({"architectures": [MINIMAX], "hidden_size": 32, "num_attention_heads": 2,
                               "num_hidden_layers": 3})
    mixer = LightningAttention(cfg, torch.float32, "cpu", layer=1, state_index=0)
    gen = torch.Generator().manual_seed(261)
    n, h, d = BLOCK + 7, 2, 16
    q, k, v = (torch.randn(n, h, d, generator=gen) * 0.3 for _ in range(3))
    state = torch.randn(h, d, d, generator=gen)
    out, end = mixer.chunked(q, k, v, state)
    s = state[None]
    for t in range(n):
        o, s = mixer.step(q[t:t + 1], k[t:t + 1], v[t:t + 1], s)
        torch.testing.assert_close(out[t], o[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(end, s[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra, match", [
    ({"sliding_window": 8}, "sliding_window"),
    ({"attn_type_list": [1, 1]}, "attn_type_list"),
    ({"postnorm": False}, "postnorm"),
    ({"layernorm_mlp_alpha": 2.0}, "layernorm_mlp_alpha"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"num_local_experts": 1}, "num_local_experts"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_minimax_unsupported_options_are_refused(extra, match):
    raw = {"architectures": [MINIMAX], "num_hidden_layers": 2, **extra}
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw)


def test_minimax_original_keys_that_agree_are_accepted():
    raw = {"architectures": [MINIMAX], "num_hidden_layers": 2, "attn_type_list": [1, 0], "postnorm": True,
           "layernorm_mlp_alpha": 1.0, "linear_attn_beta_factor": 0.5, "layernorm_linear_attention_beta": 0.5}
    assert ModelConfig.from_hf(raw).options.residual_factors[1] == (1.0, 0.5)


def test_minimax_tensor_parallelism_and_lora_are_refused(tiny_checkpoints):
    with pytest.raises(TensorParallelConfigError, match="lightning attention"):
        check(ModelConfig.from_hf({"architectures": [MINIMAX]}), 2)
    path = str(tiny_checkpoints["minimax"])
    with pytest.raises(Exception, match="LoRA adapters are not supported"):
        LLMEngine(EngineConfig(model=path, num_blocks=32, block_size=4, max_loras=1))
