"""config.json parsing of Solar Open, Jais 2 and HyperCLOVA X SEED: the
defaults transformers' config classes fill in, the options read, a clear
CheckpointError for what the engine does not support, and the paths the
shared parity tests leave out. Token parity: test_moe_parity (variant
solar_open), at tensor_parallel_size 2 test_tp_engine (slow);
test_model_parity / test_engine_parity (variant jais2); test_model_parity /
test_engine_parity (variant hyperclovax), at tensor_parallel_size 2
test_tp_engine (slow), LoRA test_lora_engine (slow)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.granite import GraniteDecoderLayer
from splitserve.engine.models.hyperclovax import PeriNormDecoderLayer
from splitserve.engine.models.layers import LayerNorm
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model, variant_kwargs, write_hf_checkpoint
from tests.unit.test_model_parity import ATOL, PROMPT, hf_logits, prompt_logits


def raw(arch: str, *absent: str, **extra) -> dict:
    """A config.json of ``arch`` without the keys ``absent``."""
    cfg = {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, **extra}
    return {k: v for k, v in cfg.items() if k not in absent}


def refused(cfg: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(cfg)


def solar(*absent: str, **extra) -> dict:
    # SolarOpenConfig writes no intermediate_size (its experts' size is moe_intermediate_size)
    return raw("SolarOpenForCausalLM", "intermediate_size", *absent, **extra)


def test_solar_open_defaults_and_options():
    cfg = ModelConfig.from_hf(solar("num_key_value_heads"))
    # SolarOpenConfig's defaults: head_dim 128 (every dim rotating), 8 KV heads, base 1e6
    assert cfg.family == "solar_open" and cfg.head_dim == 128 and cfg.options.rotary_dim is None
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.rms_norm_eps) == (8, 1_000_000.0, 1e-5)
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size) == (128, 8, 1280)
    assert moe.shared_expert_intermediate_size == 1280 and moe.renormalize and moe.grouped_sigmoid
    assert (moe.num_groups, moe.topk_groups, moe.routed_scaling_factor) == (1, 1, 1.0)
    assert all(moe.sparse_layers) and cfg.intermediate_size == 1280
    assert not cfg.qk_norm and cfg.options.mtp_layers == 0 and not cfg.tie_word_embeddings
    # GLM-4.5's keys that transformers' Solar Open does not read are not read here either
    cfg = ModelConfig.from_hf(solar(first_k_dense_replace=1, use_qk_norm=True, intermediate_size=96,
                                    attention_bias=True, n_routed_experts=16, n_group=4, topk_group=2,
                                    num_experts_per_tok=3, n_shared_experts=2, moe_intermediate_size=32,
                                    norm_topk_prob=False, routed_scaling_factor=2.0, head_dim=16,
                                    rope_parameters={"rope_type": "default", "rope_theta": 50.0,
                                                     "partial_rotary_factor": 0.5}))
    moe = cfg.moe
    assert all(moe.sparse_layers) and not cfg.qk_norm and cfg.intermediate_size == 32
    assert (moe.num_experts, moe.num_groups, moe.topk_groups, moe.top_k) == (16, 4, 2, 3)
    assert moe.shared_expert_intermediate_size == 64
    assert (moe.renormalize, moe.routed_scaling_factor) == (False, 2.0)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, False, False)
    assert cfg.options.rotary_dim == 8 and cfg.rope_theta == 50.0
    check(cfg, 2)  # splits as GLM-4.5's: test_tp_engine checks its tokens at TP=2


def test_solar_open_chunked_prefill_with_prefix_hits(tiny_checkpoints):
    path = tiny_checkpoints["solar_open"]
    prompts = [list(range(20, 37)), [5, 9, 13, 17, 21, 25, 29, 33, 3], PROMPT]
    want = hf_greedy(hf_model(path), prompts, 6)
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=4, max_num_batched_tokens=5,
                                 max_num_seqs=4))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, params)] == want  # prefilled in chunks of 5
    h0 = eng.kv.pool.hits
    assert [r.token_ids for r in eng.generate(prompts, params)] == want  # full blocks from the cache
    assert eng.kv.pool.hits - h0 >= 3  # each prompt
    eng.kv.check_invariants()
    assert eng.kv.all_free()


@pytest.mark.parametrize("extra, match", [
    ({"n_group": 3}, "n_group \\(3\\) must split n_routed_experts \\(128\\)"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for solar_open"),
    ({"quantization_config": {"quant_method": "fp8"}},
     "fp8 SolarOpenForCausalLM checkpoints are not supported"),
    ({"partial_rotary_factor": 0.01}, "gives 1 rotated dims of 128"),
])
def test_solar_open_unsupported_options_are_refused(extra, match):
    refused(solar(**extra), match)


def test_jais2_defaults():
    # its eps is layer_norm_eps (rms_norm_eps is not read); biases on by default
    cfg = ModelConfig.from_hf(raw("Jais2ForCausalLM", "num_key_value_heads", rms_norm_eps=0.5))
    assert cfg.family == "jais2" and cfg.rms_norm_eps == 1e-5 and cfg.head_dim == 16
    assert cfg.num_kv_heads == 4 and cfg.rope_theta == 10000.0 and cfg.options.rotary_dim is None
    opts = cfg.options
    assert (opts.hidden_act, opts.plain_mlp, opts.layer_norm) == ("relu2", ("up_proj", "down_proj"), True)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.tie_word_embeddings) == (0, (150024,), False)
    cfg = ModelConfig.from_hf(raw("Jais2ForCausalLM", "max_position_embeddings", layer_norm_eps=1e-3,
                                  attention_bias=False, mlp_bias=False))
    assert cfg.rms_norm_eps == 1e-3
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (False, False, False)
    assert cfg.max_position == 8192
    check(cfg, 2)  # its LayerNorms whole on every rank, heads and MLP split
    with pytest.raises(TensorParallelConfigError, match="Jais2ForCausalLM cannot run at tensor_parallel_size 3"):
        check(cfg, 3)


def test_jais2_layer_norms_load_and_lora_takes_the_ungated_mlp(tiny_checkpoints):
    model = load_model(load_checkpoint(tiny_checkpoints["jais2"]), dtype=torch.float32, device="cpu")
    norm = model.layers[0].input_layernorm
    assert isinstance(norm, LayerNorm) and norm.eps == 1e-2
    ref = hf_model(tiny_checkpoints["jais2"]).model.layers[0].input_layernorm
    torch.testing.assert_close(norm.bias, ref.bias)  # the perturbed bias, where transformers has it
    assert {name for _, name in model.enable_lora(2, 4)} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                             "up_proj", "down_proj"}


@pytest.mark.parametrize("extra, match", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    ({"hidden_act": "xielu"}, "hidden_act 'xielu' is not supported for jais2"),
])
def test_jais2_unsupported_options_are_refused(extra, match):
    refused(raw("Jais2ForCausalLM", **extra), match)


def test_hyperclovax_defaults():
    cfg = ModelConfig.from_hf(raw("HyperCLOVAXForCausalLM", "num_key_value_heads"))
    opts = cfg.options
    # attention_multiplier absent: head_dim ** -0.5; the other scalars 1; post-norms on
    assert cfg.family == "hyperclovax" and opts.attn_scale is None and opts.sandwich_norms
    assert (opts.embed_scale, opts.residual_scale, opts.logit_scale, opts.logits_divisor) == (1, 1, 1, 1)
    assert (cfg.rms_norm_eps, cfg.bos_token_id, cfg.eos_token_ids, cfg.num_kv_heads) == (1e-6, 1, (2,), 4)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias, cfg.head_dim) == (False, False, False, 16)
    cfg = ModelConfig.from_hf(raw("HyperCLOVAXForCausalLM", attention_multiplier=0.5, logits_scaling=4.0,
                                  embedding_multiplier=2.0, residual_multiplier=0.25, use_post_norm=False,
                                  attention_bias=True, mlp_bias=True))
    opts = cfg.options
    assert (opts.attn_scale, opts.logit_scale, opts.logits_divisor) == (0.5, 4.0, 1.0)
    assert (opts.embed_scale, opts.residual_scale, opts.sandwich_norms) == (2.0, 0.25, False)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)
    check(cfg, 2)  # splits: test_tp_engine checks its tokens at TP=2


def test_hyperclovax_without_post_norms_matches_transformers(tiny_checkpoints, tmp_path):
    # use_post_norm false: Granite's layers, the logits still multiplied
    path = write_hf_checkpoint(tmp_path / "no-post-norm", "HyperCLOVAXConfig",
                               {**variant_kwargs("hyperclovax", tiny_checkpoints.vocab_size),
                                "use_post_norm": False}, 205, {},
                               tiny_checkpoints.tokenizer_dir)
    model = load_model(load_checkpoint(path), dtype=torch.float32, device="cpu")
    assert type(model.layers[0]) is GraniteDecoderLayer
    torch.testing.assert_close(prompt_logits(model), hf_logits(hf_model(path), PROMPT), atol=ATOL, rtol=0)
    with_norms = load_model(load_checkpoint(tiny_checkpoints["hyperclovax"]), dtype=torch.float32,
                            device="cpu")
    assert isinstance(with_norms.layers[0], PeriNormDecoderLayer)


@pytest.mark.parametrize("extra, match", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5 is not supported"),
    ({"logits_scaling": -1.0}, "logits_scaling must be a positive number"),
    ({"hidden_act": "relu2"}, "activation 'relu2' is not supported for hyperclovax"),
])
def test_hyperclovax_unsupported_options_are_refused(extra, match):
    refused(raw("HyperCLOVAXForCausalLM", **extra), match)
