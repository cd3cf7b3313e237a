"""GPT-2 and OPT: config.json translation (their own key names and
transformers' defaults), the options they refuse, checkpoints of the bare
base model (no ``transformer.`` / ``model.`` prefix), GPT-2's attention
scale switches and OPT-350m's layout against transformers, and the learned
position table's end as the engine's context limit. Token parity of the default variants is in
test_model_parity / test_engine_parity."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError, InvalidRequestError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models import build_model
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import COMMON, VARIANTS, hf_greedy, hf_model, write_hf_checkpoint
from tests.unit.test_family_bigcode_neo import bigcode_raw, neo_raw
from tests.unit.test_model_parity import ATOL, PROMPT, hf_logits, prompt_logits


def gpt2_raw(**extra) -> dict:  # as GPT2Config writes it
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 32,
            "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, **extra}


def opt_raw(**extra) -> dict:  # as OPTConfig writes it
    return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 32,
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 96,
            "max_position_embeddings": 128, "word_embed_proj_dim": 64, **extra}


def test_gpt2_config_keys_and_defaults():
    cfg = ModelConfig.from_hf(gpt2_raw(num_key_value_heads=2, head_dim=8))  # stray Llama keys
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == ("gpt2", 64, 2, 4)
    # n_inner None: 4 x n_embd; one KV head per head, hidden / heads wide, whatever else is there
    assert (cfg.intermediate_size, cfg.num_kv_heads, cfg.head_dim) == (256, 4, 16)
    assert (cfg.max_position, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (128, 1e-5, True)
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (50256, (50256,))
    opts = cfg.options
    assert (opts.hidden_act, opts.layer_norm, opts.plain_mlp) == ("gelu_tanh", True, ("c_fc", "c_proj"))
    assert (opts.position_table, opts.position_offset, opts.attn_scale) == ("model.embed_positions", 0, None)
    cfg = ModelConfig.from_hf(gpt2_raw(n_inner=96, layer_norm_epsilon=1e-3, activation_function="relu",
                                       scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True,
                                       reorder_and_upcast_attn=True, tie_word_embeddings=False))
    assert (cfg.intermediate_size, cfg.rms_norm_eps, cfg.options.hidden_act) == (96, 1e-3, "relu")
    assert (cfg.options.attn_scale, cfg.options.inverse_layer_attn_scale) == (1.0, True)
    assert not cfg.tie_word_embeddings


def test_opt_config_keys_and_defaults():
    cfg = ModelConfig.from_hf(opt_raw())
    assert (cfg.family, cfg.intermediate_size, cfg.num_kv_heads, cfg.head_dim) == ("opt", 96, 4, 16)
    assert (cfg.max_position, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (128, 1e-5, True)
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (2, (2,))
    opts = cfg.options
    assert (opts.hidden_act, opts.plain_mlp, opts.o_proj_name) == ("relu", ("fc1", "fc2"), "out_proj")
    assert (opts.position_table, opts.position_offset) == ("model.embed_positions", 2)
    unbiased = ModelConfig.from_hf(opt_raw(enable_bias=False))
    assert not (unbiased.attention_bias or unbiased.o_proj_bias or unbiased.mlp_bias)
    assert (opts.norm_after_block, opts.final_norm, opts.embed_proj_dim) == (False, True, 0)
    # 2 rows before position 0: the table has max_position + 2 rows
    model = build_model(cfg, torch.float32, "cpu")
    assert model.embed_positions.shape == (130, 64) and model.cos_sin_cache is None
    # OPT-350m: norms after each block and no final one, 32-wide embeddings projected in and out
    opts = ModelConfig.from_hf(opt_raw(do_layer_norm_before=False, word_embed_proj_dim=32)).options
    assert (opts.norm_after_block, opts.final_norm, opts.embed_proj_dim) == (True, False, 32)
    assert not ModelConfig.from_hf(opt_raw(_remove_final_layer_norm=True)).options.final_norm


QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}


@pytest.mark.parametrize("raw, match", [
    (gpt2_raw(add_cross_attention=True), "add_cross_attention"),
    (gpt2_raw(activation_function="quick_gelu"), "activation_function 'quick_gelu'"),
    (gpt2_raw(quantization_config=QUANT), "fp8 GPT-2 checkpoints are not supported"),
    (gpt2_raw(n_head=5), r"n_embd \(64\) must be a multiple of n_head \(5\)"),
    (opt_raw(word_embed_proj_dim=-1), "word_embed_proj_dim must be positive"),
    (opt_raw(layer_norm_elementwise_affine=False), "layer_norm_elementwise_affine"),
    (opt_raw(quantization_config=QUANT), "fp8 OPT checkpoints are not supported"),
])
def test_unsupported_options_are_refused(raw, match):
    with pytest.raises(CheckpointError, match=match) as e:
        ModelConfig.from_hf(raw)
    assert str(e.value).startswith("config.json")


@pytest.mark.parametrize("raw", [gpt2_raw(), opt_raw(), bigcode_raw(), neo_raw()])
def test_tensor_parallel_splits_by_heads_and_lora_stacks(raw):
    # the learned-position-table families (GPT-BigCode's and GPT-Neo's configs: test_family_bigcode_neo)
    cfg = ModelConfig.from_hf(raw)
    check(cfg, 2)  # the position table whole on every rank, as the norms
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(\d+\) is not a multiple"):
        check(cfg, 3)
    model = build_model(cfg, torch.float32, "cpu")
    if cfg.family in ("opt", "gpt_neo"):
        with pytest.raises(CheckpointError, match="LoRA adapters are not supported"):
            model.enable_lora(2, 4)
    else:  # c_attn's q/k/v parts, c_proj as o_proj, the MLP by its names (PEFT parity: test_lora_engine)
        assert {name for _, name in model.enable_lora(2, 4)} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "c_fc", "c_proj"}


@pytest.mark.parametrize("variant, prefix", [("gpt2", "transformer."), ("opt", "model.")])
def test_bare_base_model_names_load_the_same_weights(parity_models, tiny_checkpoints, variant, prefix):
    # the original OpenAI / facebook exports: GPT2Model's / OPTModel's names, mask buffers included
    model, _ = parity_models(variant)
    ck = load_checkpoint(tiny_checkpoints[variant])
    tensors = {k.removeprefix(prefix): v for f in ck.weight_files for k, v in load_file(f).items()}
    if variant == "gpt2":
        tensors.update({f"h.{i}.attn.bias": torch.ones(1, 1, 4, 4) for i in range(2)})
    bare = build_model(ck.model_config, torch.float32, "cpu")
    bare.load_weights(tensors.items())
    for (name, p), (name2, q) in zip(model.named_parameters(), bare.named_parameters()):
        assert name == name2 and torch.equal(p, q), name


def test_gpt2_attention_scale_switches_match_transformers(tmp_path, tiny_tokenizer_dir, tiny_checkpoints):
    vocab = load_checkpoint(tiny_checkpoints["gpt2"]).model_config.vocab_size
    for i, switches in enumerate(({"scale_attn_by_inverse_layer_idx": True},
                                  {"scale_attn_weights": False, "n_inner": 96})):
        path = write_hf_checkpoint(tmp_path / str(i), "GPT2Config",
                                   {**COMMON, "vocab_size": vocab, **switches}, 40, {}, tiny_tokenizer_dir)
        model = load_model(load_checkpoint(path), torch.float32)
        torch.testing.assert_close(prompt_logits(model), hf_logits(hf_model(path), PROMPT), atol=ATOL, rtol=0)


# over the opt variant: OPT-350m's norms after each block (no final norm) with 32-wide
# embeddings and LM head projected to and from hidden_size; a removed final norm alone
OPT_LAYOUTS = {
    "post_norm_projected": {"do_layer_norm_before": False, "word_embed_proj_dim": 32},
    "no_final_norm": {"_remove_final_layer_norm": True},
}


@pytest.mark.parametrize("layout", OPT_LAYOUTS)
def test_opt_layouts_match_transformers(tmp_path, tiny_tokenizer_dir, tiny_checkpoints, layout):
    vocab = load_checkpoint(tiny_checkpoints["opt"]).model_config.vocab_size
    path = write_hf_checkpoint(tmp_path / layout, "OPTConfig",
                               {**COMMON, "vocab_size": vocab, **VARIANTS["opt"][1], **OPT_LAYOUTS[layout]},
                               41, {}, tiny_tokenizer_dir)
    ref = hf_model(path)
    model = load_model(load_checkpoint(path), torch.float32)
    torch.testing.assert_close(prompt_logits(model), hf_logits(ref, PROMPT), atol=ATOL, rtol=0)
    # through the engine: chunked prefill, then the same prompts again from the prefix cache
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=4,
                                 max_num_batched_tokens=5, max_num_seqs=4))
    prompts = [PROMPT, PROMPT[:9] + [3, 4], list(range(3, 40))]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = hf_greedy(ref, prompts, 6)
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
    h0 = eng.kv.pool.hits
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
    assert eng.kv.pool.hits - h0 == len(prompts)  # each prompt's full blocks came from the cache


@pytest.mark.parametrize("variant", ["gpt2", "opt"])
def test_context_is_capped_at_the_position_table(tiny_checkpoints, variant):
    # a longer max_model_len is cut to the table's 256 rows; a prompt running into its
    # end stops there with transformers' tokens, and one asking past it is refused
    path = tiny_checkpoints[variant]
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=80, block_size=4, max_model_len=4096))
    assert eng.max_model_len == COMMON["max_position_embeddings"] == 256
    prompt = [(7 * i) % 300 + 3 for i in range(250)]
    with pytest.raises(InvalidRequestError, match="at most 6 tokens can be generated"):
        eng.generate([prompt], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    out = eng.generate([prompt], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf_model(path), [prompt], 6)[0]
    assert out.finish_reason == "length"
