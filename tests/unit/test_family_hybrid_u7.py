"""MiniMax-Text-01 (lightning attention beside softmax attention, experts
in every layer) and the Bailing hybrid (Kimi Delta Attention with its own
gates beside gated latent attention): config.json read as transformers'
config classes read it, MiniMax's decay rates and chunked lightning form
against the token-by-token rule, Bailing's forget gates against
transformers', its multi-token-prediction layers skipped, and what is
refused. Token parity through LLMEngine is in test_hybrid_parity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.models.lightning import BLOCK, LightningAttention, slope_rates
from splitserve.engine.parallel.plan import TensorParallelConfigError, check

MINIMAX = "MiniMaxForCausalLM"
BAILING = "BailingHybridForCausalLM"


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


def test_bailing_config_matches_transformers():
    import transformers

    raw = {"architectures": [BAILING], "num_hidden_layers": 7, "num_local_experts": 16, "n_group": 4}
    cfg, ref = ModelConfig.from_hf(raw), transformers.BailingHybridConfig(**{k: v for k, v in raw.items()
                                                                             if k != "architectures"})
    moe, mla, opts, kda = cfg.moe, cfg.options.mla, cfg.options, cfg.options.gated_delta_net
    assert (cfg.hidden_size, cfg.num_heads, cfg.vocab_size, cfg.rms_norm_eps, cfg.max_position) == (
        ref.hidden_size, ref.num_attention_heads, ref.vocab_size, ref.rms_norm_eps, ref.max_position_embeddings)
    assert (moe.num_experts, moe.top_k, moe.renormalize, moe.num_groups, moe.topk_groups) == (
        ref.num_local_experts, ref.num_experts_per_tok, ref.norm_topk_prob, ref.n_group, ref.topk_group)
    assert moe.routed_scaling_factor == pytest.approx(ref.routed_scaling_factor)
    assert moe.shared_expert_intermediate_size == ref.moe_intermediate_size * ref.n_shared_experts
    assert moe.sparse_layers == tuple(t == "sparse" for t in ref.mlp_layer_types)
    assert opts.hybrid.layer_kinds == tuple(ATTENTION if t == "full_attention" else "kimi_delta_attention"
                                           for t in ref.layer_types)
    assert (kda.num_k_heads, kda.k_head_dim, kda.conv_kernel, kda.forget_gate_bound) == (
        ref.linear_num_heads, ref.linear_head_dim, ref.linear_conv_kernel_dim, ref.kda_lower_bound)
    assert (mla.q_lora_rank or None, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim,
            mla.v_head_dim) == (ref.q_lora_rank, ref.kv_lora_rank, ref.qk_nope_head_dim, ref.qk_rope_head_dim,
                                ref.v_head_dim)
    assert opts.interleaved_rope and opts.rotary_dim == ref.qk_rope_head_dim == ref.head_dim
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert opts.mtp_layers == ref.num_mtp_layers and not cfg.tie_word_embeddings


@pytest.mark.parametrize("safe", [True, False])
def test_bailing_forget_gate_matches_transformers(safe):
    import transformers
    from transformers.models.bailing_hybrid.modeling_bailing_hybrid import BailingHybridForgetGate

    from splitserve.engine.models.bailing_hybrid import BailingDeltaAttention

    raw = {"hidden_size": 32, "num_attention_heads": 2, "head_dim": 8, "kda_safe_gate": safe,
           "kda_lower_bound": -2.0, "num_hidden_layers": 2}
    gen = torch.Generator().manual_seed(263)
    ref = BailingHybridForgetGate(transformers.BailingHybridConfig(**raw))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    mixer = BailingDeltaAttention(ModelConfig.from_hf({"architectures": [BAILING], **raw}), torch.float32, "cpu", 0)
    mixer.A_log.data.copy_(ref.A_log)
    mixer.dt_bias.data.copy_(ref.dt_bias)
    x = torch.randn(5, 32, generator=gen)
    got = mixer.forget_gate(ref.f_proj(x).detach())
    torch.testing.assert_close(got, ref(x[None]).detach()[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("extra, match", [
    ({"expert_swiglu_limit_list": [0, 7.0]}, "expert_swiglu_limit_list"),
    ({"share_expert_swiglu_limit_list": [0]}, "share_expert_swiglu_limit_list"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"short_conv_kernel_size": 1}, "short_conv_kernel_size"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"mlp_layer_types": ["dense"]}, "mlp_layer_types"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_bailing_unsupported_options_are_refused(extra, match):
    raw = {"architectures": [BAILING], "num_hidden_layers": 2, "num_attention_heads": 4, **extra}
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw)


def test_bailing_skips_mtp_layers_and_refuses_tp_and_lora(tiny_checkpoints, tmp_path):
    # a checkpoint with its multi-token-prediction layer (layer 3 of 3) loads; TP and LoRA are refused
    from safetensors.torch import load_file, save_file

    with pytest.raises(TensorParallelConfigError, match="Kimi Delta Attention"):
        check(ModelConfig.from_hf({"architectures": [BAILING]}), 2)
    src = tiny_checkpoints["bailing_hybrid"]
    out = tmp_path / "bailing_mtp"
    shutil.copytree(src, out)
    tensors = load_file(str(src / "model.safetensors"))
    tensors.update({k.replace("layers.2.", "layers.3."): t.clone() for k, t in tensors.items() if "layers.2." in k})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    LLMEngine(EngineConfig(model=str(out), num_blocks=32, block_size=4))
    with pytest.raises(Exception, match="LoRA adapters are not supported"):
        LLMEngine(EngineConfig(model=str(out), num_blocks=32, block_size=4, max_loras=1))
