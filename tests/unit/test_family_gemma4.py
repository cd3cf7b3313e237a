"""Gemma 4 text: config.json parsing (transformers' defaults, the per-layer shape from
``global_head_dim`` as released checkpoints write it and from ``per_layer_config`` as
transformers 5.25 writes it, what is refused, naming the option), chunked prefill
over the caches the shared layers reuse, the ``Gemma4ForConditionalGeneration`` text
tower, chunked prefill through the experts, a KV hand-off between engines, ``weight_dtype: fp8``, and the LoRA and
tensor-parallel refusals. The variants' token parity is in
test_model_parity / test_engine_parity."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.gemma4_config import LayerRope
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.layers import Linear
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import COMMON, hf_greedy, hf_model, variant_kwargs, write_hf_checkpoint
from tests.fixtures.handoff import handoff_generate
from tests.unit.test_fp8_engine import LOGIT_REL_BOUND
from tests.unit.test_model_parity import (ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, prompt_logits,
                                          run, step_meta)


def gemma4(**extra) -> dict:
    return {"architectures": ["Gemma4ForCausalLM"], "vocab_size": 32, "hidden_size": 64,
            "num_hidden_layers": 6, "num_attention_heads": 4, **extra}


def test_defaults_as_transformers_derives_them():
    cfg = ModelConfig.from_hf(gemma4())
    shape = cfg.options.gemma4
    # five sliding layers (256 wide, 4 KV heads), then a full one of global_head_dim 512
    assert shape.head_dims == (256,) * 5 + (512,) and shape.kv_heads == (4,) * 6
    assert (cfg.head_dim, cfg.num_kv_heads) == (512, 4)
    assert cfg.layer_windows == (512,) * 5 + (0,)
    assert shape.ropes[0] == LayerRope(10_000.0, 256, 128)
    assert shape.ropes[5] == LayerRope(1_000_000.0, 512, 64)  # proportional, a quarter of the pairs
    assert shape.k_eq_v == (False,) * 6 and shape.kv_source == tuple(range(6))
    assert (shape.ple_dim, shape.ple_vocab) == (256, 262_144)
    opts = cfg.options
    assert opts.attn_scale == 1.0 and opts.final_softcap == 0.0 and opts.hidden_act == "gelu_tanh"
    assert opts.embed_scale == 8.0 and not opts.norm_plus_one and opts.norm_fp32_product
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-6 and cfg.max_position == 131_072


def test_global_keys_match_per_layer_config():
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    base = gemma4(num_hidden_layers=4, head_dim=16, num_key_value_heads=2, layer_types=types,
                  attention_k_eq_v=True)
    released = ModelConfig.from_hf({**base, "global_head_dim": 32, "num_global_key_value_heads": 1})
    written = ModelConfig.from_hf({**base, "per_layer_config": {
        "1": {"head_dim": 32, "num_key_value_heads": 1}, "3": {"head_dim": 32, "num_key_value_heads": 1}}})
    assert released.options.gemma4 == written.options.gemma4
    shape = released.options.gemma4
    assert shape.kv_heads == (2, 1, 2, 1) and shape.k_eq_v == (False, True, False, True)
    assert (released.head_dim, released.num_kv_heads) == (32, 2)
    # without attention_k_eq_v, num_global_key_value_heads is not read
    plain = ModelConfig.from_hf({**base, "attention_k_eq_v": False, "num_global_key_value_heads": 1})
    assert plain.options.gemma4.kv_heads == (2,) * 4 and not any(plain.options.gemma4.k_eq_v)


def test_kv_sharing_sources_and_double_wide_mlp():
    types = ["sliding_attention", "full_attention"] * 3
    cfg = ModelConfig.from_hf(gemma4(layer_types=types, num_kv_shared_layers=3, use_double_wide_mlp=True,
                                     intermediate_size=128))
    shape = cfg.options.gemma4
    assert shape.kv_source == (0, 1, 2, 1, 2, 1)  # the last sliding / full layer before them
    assert shape.intermediate == (128, 128, 128, 256, 256, 256)


def test_experts_keys():
    cfg = ModelConfig.from_hf(gemma4(enable_moe_block=True, num_experts=8, top_k_experts=2,
                                     moe_intermediate_size=16))
    shape = cfg.options.gemma4
    assert (shape.num_experts, shape.top_k, shape.moe_intermediate) == (8, 2, 16)
    assert ModelConfig.from_hf(gemma4(num_experts=8)).options.gemma4.num_experts == 0  # off unless enabled


def test_bidirectional_vision_is_causal_text():
    # "vision" lets image tokens attend both ways; the text the engine serves stays causal
    assert ModelConfig.from_hf(gemma4(use_bidirectional_attention="vision")).family == "gemma4"


@pytest.mark.parametrize("extra, match", [
    ({"enable_moe_block": True, "top_k_experts": 2, "moe_intermediate_size": 8}, "positive num_experts"),
    ({"enable_moe_block": True, "num_experts": 2, "top_k_experts": 3, "moe_intermediate_size": 8},
     "top_k_experts"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1.0}}}, "yarn"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1.0}}},
     "sliding_attention"),
    ({"per_layer_config": {"5": {"head_dim": 64, "sliding_window": 4}}}, "sliding_window"),
    ({"per_layer_config": {"0": {"head_dim": 64}}}, "different head widths"),
    ({"num_kv_shared_layers": 1, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]},
     "num_kv_shared_layers"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
    ({"sliding_window": None}, "sliding_window is null"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_refused_options_are_named(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(gemma4(**extra))


def test_tensor_parallel_and_lora_refused(parity_models):
    model, _ = parity_models("gemma4")
    with pytest.raises(TensorParallelConfigError, match="Gemma 4"):
        check(model.cfg, 2)
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for Gemma 4"):
        model.enable_lora(2, 4)


@pytest.mark.parametrize("variant", ["gemma4", "gemma4_shared"])
def test_weight_dtype_fp8_quantizes_at_load(tiny_checkpoints, parity_models, variant):
    # every projection, the per-layer input ones and the shared layers' q-only ones included
    model = load_model(load_checkpoint(tiny_checkpoints[variant]), torch.float32, weight_dtype="fp8")
    fp8 = [m.weight.dtype == torch.float8_e4m3fn for m in model.modules() if isinstance(m, Linear)]
    assert fp8 and all(fp8)
    full, _ = parity_models(variant)
    logits, ref = prompt_logits(model), prompt_logits(full)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < LOGIT_REL_BOUND


@pytest.mark.parametrize("variant", ["gemma4_shared", "gemma4_moe"])
def test_chunked_prefill_matches_transformers(parity_models, variant):
    """Prefilled in chunks of 5, 4 and 3 tokens: the shared layers attend over the
    keys and values their source layers cached in earlier chunks; the experts route
    each chunk's tokens."""
    model, ref = parity_models(variant)
    want = hf_logits(ref, PROMPT)
    kv, done = new_cache(model), 0
    for n in (5, 4, 3):
        positions, meta = step_meta([IDENTITY_TABLE], [done], [n])
        got = run(model, kv, PROMPT[done:done + n], positions, meta)
        torch.testing.assert_close(got, want[done:done + n], atol=ATOL, rtol=0)
        done += n
    if variant == "gemma4_shared":
        # the two shared layers (last) keep no cache: the two before them fill it
        assert model.cfg.num_cache_layers == 2 and kv.shape[0] == 2
        assert all(kv[i].abs().sum() > 0 for i in range(2))


def test_shared_kv_handoff_into_second_engine(tiny_checkpoints, parity_models):
    """Prefilled in one engine, decoded in another from the handed-off blocks: the
    shared layers read their source layers' keys and values there."""
    _, ref = parity_models("gemma4_shared")
    prompts = [list(range(20, 37))]  # past the window of 8, over 5 blocks
    want = hf_greedy(ref, prompts, 3)
    src, dst = (LLMEngine(EngineConfig(model=str(tiny_checkpoints["gemma4_shared"]), num_blocks=32, block_size=4,
                                       max_num_batched_tokens=8)) for _ in range(2))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert handoff_generate(src, dst, prompts, params) == want
    assert src.kv.all_free() and dst.kv.all_free()
    # the cache, its size per token and what a hand-off ships: the two layers that cache
    mc = src.model_cfg
    assert src.runner.kv_cache.shape[0] == mc.num_cache_layers == 2 < mc.num_layers
    assert mc.kv_bytes_per_token(torch.float32) == 2 * 2 * mc.num_kv_heads * mc.head_dim * 4


def test_conditional_generation_text_tower(tmp_path, tiny_tokenizer_dir, tiny_checkpoints):
    """``Gemma4ForConditionalGeneration`` (no vision or audio tower here): the text model
    read from under ``model.language_model.``, as transformers computes it."""
    text = {k: v for k, v in variant_kwargs("gemma4", tiny_checkpoints.vocab_size).items()
            if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    path = write_hf_checkpoint(tmp_path / "gemma4_cg", "Gemma4Config",
                               {"text_config": text, "vision_config": None, "audio_config": None,
                                "bos_token_id": COMMON["bos_token_id"]}, 216, {}, tiny_tokenizer_dir)
    model = load_model(load_checkpoint(path), torch.float32)
    assert model.cfg.architecture == "Gemma4ForConditionalGeneration"
    torch.testing.assert_close(prompt_logits(model), hf_logits(hf_model(path), PROMPT), atol=ATOL, rtol=0)
