"""Kimi Linear (Kimi Delta Attention beside latent attention without RoPE):
config.json read as transformers' KimiLinearConfig reads it (its defaults,
the original checkpoints' key names and ``linear_attn_config``), a
checkpoint in the original tensor names (dense MLPs under ``mlp``) against
transformers, the KDA chunked rule against its token-by-token form, and what
is refused. Token parity through LLMEngine is in test_hybrid_parity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.models import kda_rule
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model

ARCH = "KimiLinearForCausalLM"
# config.json as Moonshot's releases write it: DeepSeek-style router keys under their own names,
# the KDA shape and 1-based layer lists in linear_attn_config, no layer_types / mlp_layer_types
ORIGINAL = {"architectures": [ARCH], "model_type": "kimi_linear", "hidden_size": 256, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 72, "rope_theta": 10000.0,
            "q_lora_rank": None, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16, "v_head_dim": 32, "mla_use_nope": True, "num_experts": 16,
            "num_experts_per_token": 4, "num_shared_experts": 2, "moe_intermediate_size": 64,
            "moe_renormalize": False, "moe_router_activation_func": "sigmoid", "routed_scaling_factor": 1.5,
            "first_k_dense_replace": 2, "moe_layer_freq": 1, "use_grouped_topk": True, "num_expert_group": 4,
            "topk_group": 2, "model_max_length": 4096,
            "linear_attn_config": {"full_attn_layers": [3, 6], "kda_layers": [1, 2, 4, 5], "head_dim": 16,
                                   "num_heads": 8, "short_conv_kernel_size": 3}}


def reference(raw: dict):
    import transformers

    return transformers.KimiLinearConfig(**{k: v for k, v in raw.items() if k != "architectures"})


@pytest.mark.parametrize("raw", [{"architectures": [ARCH]}, ORIGINAL], ids=["defaults", "original"])
def test_config_matches_transformers(raw):
    cfg, ref = ModelConfig.from_hf(raw), reference(raw)
    moe, mla, opts = cfg.moe, cfg.options.mla, cfg.options
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size, cfg.rms_norm_eps) == (
        ref.num_hidden_layers, ref.hidden_size, ref.num_attention_heads, ref.vocab_size, ref.rms_norm_eps)
    assert cfg.max_position == ref.max_position_embeddings
    assert (moe.num_experts, moe.top_k, moe.renormalize, moe.num_groups, moe.topk_groups) == (
        ref.num_local_experts, ref.num_experts_per_tok, ref.norm_topk_prob, ref.n_group, ref.topk_group)
    assert moe.routed_scaling_factor == pytest.approx(ref.routed_scaling_factor)
    assert moe.shared_expert_intermediate_size == ref.moe_intermediate_size * ref.n_shared_experts
    assert moe.sparse_layers == tuple(t == "sparse" for t in ref.mlp_layer_types)
    assert opts.hybrid.layer_kinds == tuple(ATTENTION if t == "full_attention" else "kimi_delta_attention"
                                           for t in ref.layer_types)
    shape = opts.gated_delta_net
    assert (shape.num_k_heads, shape.k_head_dim, shape.conv_kernel) == (
        ref.linear_num_heads, ref.linear_head_dim, ref.linear_conv_kernel_dim)
    assert (mla.q_lora_rank or None, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim,
            mla.v_head_dim) == (ref.q_lora_rank, ref.kv_lora_rank, ref.qk_nope_head_dim, ref.qk_rope_head_dim,
                                ref.v_head_dim)
    assert opts.attn_scale == pytest.approx(ref.qk_head_dim ** -0.5)
    assert cfg.num_cache_layers == ref.layer_types.count("full_attention")


def test_lm_head_is_never_tied():
    # transformers' KimiLinearForCausalLM ties no weights: lm_head.weight is its own tensor
    assert not ModelConfig.from_hf({"architectures": [ARCH], "tie_word_embeddings": True}).tie_word_embeddings


@pytest.mark.parametrize("extra, match", [
    ({"mla_use_nope": False}, "mla_use_nope"),
    ({"moe_router_activation_func": "softmax"}, "moe_router_activation_func"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"linear_attn_config": {"short_conv_kernel_size": 1}}, "short_conv_kernel_size"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"mlp_layer_types": ["dense"]}, "mlp_layer_types"),
    ({"layer_types": None, "linear_attn_config": {"full_attn_layers": [2], "kda_layers": [1, 3]}},
     "kda_layers"),
])
def test_unsupported_options_are_refused(extra, match):
    raw = {"architectures": [ARCH], "num_hidden_layers": 2, "num_attention_heads": 4,
           "layer_types": ["linear_attention", "full_attention"], **extra}
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw)


def test_tensor_parallelism_and_lora_are_refused(tiny_checkpoints):
    with pytest.raises(TensorParallelConfigError, match="Kimi Delta Attention"):
        check(ModelConfig.from_hf({"architectures": [ARCH]}), 2)
    path = str(tiny_checkpoints["kimi_linear"])
    with pytest.raises(Exception, match="LoRA adapters are not supported"):
        LLMEngine(EngineConfig(model=path, num_blocks=32, block_size=4, max_loras=1))


def test_chunked_rule_matches_token_by_token():
    # a prompt over three chunks, decays from none to strong, from a nonzero state
    gen = torch.Generator().manual_seed(246)
    n, h, dk, dv = 2 * kda_rule.CHUNK + 5, 2, 8, 4
    q, k = (torch.nn.functional.normalize(torch.randn(n, h, dk, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(n, h, dv, generator=gen)
    g = -4 * torch.rand(n, h, dk, generator=gen) * torch.rand(n, h, 1, generator=gen)
    beta = torch.rand(n, h, generator=gen)
    state = torch.randn(h, dk, dv, generator=gen)
    out, end = kda_rule.chunked(q, k, v, g, beta, state)
    s = state[None]
    for t in range(n):
        o, s = kda_rule.recurrent_step(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1], s)
        torch.testing.assert_close(out[t], o[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end, s[0], atol=1e-5, rtol=1e-5)


def test_original_checkpoint_names_load(tiny_checkpoints, tmp_path):
    # the dense layer's MLP under ``mlp`` (Moonshot's name; transformers saves it under
    # block_sparse_moe), the layer kinds from linear_attn_config's 1-based lists
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoints["kimi_linear"]
    out = tmp_path / "kimi_original"
    shutil.copytree(src, out)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {k.replace("layers.2.block_sparse_moe.", "layers.2.mlp."): t for k, t in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    del cfg["layer_types"]
    cfg["linear_attn_config"] = {"full_attn_layers": [2, 4], "kda_layers": [1, 3], "head_dim": 8, "num_heads": 4,
                                 "short_conv_kernel_size": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    prompts = [[5, 9, 13, 21, 8], list(range(40, 80))]
    want = hf_greedy(hf_model(out), prompts, 5)
    eng = LLMEngine(EngineConfig(model=str(out), num_blocks=64, block_size=4, max_num_batched_tokens=16))
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
