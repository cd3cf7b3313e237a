"""config.json parsing of Qwen3.5, Qwen3.5-MoE (and their multimodal wrappers' text
models) and OLMo Hybrid: the defaults transformers' config classes fill in (checked
against those classes), what is refused with a clear CheckpointError, the multimodal
RoPE of text tokens against transformers' own table, a wrapper checkpoint, fused
experts and OLMo Hybrid without RoPE served through LLMEngine. Token parity of the
text models is in test_hybrid_parity (variants qwen3_5, qwen3_5_moe, olmo_hybrid)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.models.rope import build_cos_sin_cache
from splitserve.engine.parallel.plan import ShardPlan, TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import COMMON, hf_greedy, hf_model, variant_kwargs, write_hf_checkpoint
from tests.unit.test_family_olmo3_exaone import hf_config

QWEN3_5 = "Qwen3_5ForCausalLM"
QWEN3_5_WRAPPED = "Qwen3_5ForConditionalGeneration"
QWEN3_5_MOE = "Qwen3_5MoeForCausalLM"
QWEN3_5_MOE_WRAPPED = "Qwen3_5MoeForConditionalGeneration"
OLMO_HYBRID = "OlmoHybridForCausalLM"
PROMPTS = [[5, 9, 13, 21, 40], list(range(30, 52))]


def assert_hybrid_shape(ours: ModelConfig, ref) -> None:
    """Layer kinds and the Gated DeltaNet's shape as transformers' config gives them."""
    kinds = tuple(ATTENTION if t == "full_attention" else "gated_delta_net" for t in ref.layer_types)
    assert ours.options.hybrid.layer_kinds == kinds
    s = ours.options.gated_delta_net
    assert (s.num_k_heads, s.num_v_heads, s.k_head_dim, s.v_head_dim, s.conv_kernel) == (
        ref.linear_num_key_heads, ref.linear_num_value_heads, ref.linear_key_head_dim,
        ref.linear_value_head_dim, ref.linear_conv_kernel_dim)


def test_qwen3_5_defaults_as_transformers_reads_them():
    c = {"architectures": [QWEN3_5]}
    ours, ref = ModelConfig.from_hf(c), hf_config("Qwen3_5TextConfig", c)
    assert ours.family == "qwen3_5" and ours.moe is None
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers) == (248320, 4096, 12288, 32)
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim)
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.tie_word_embeddings == ref.tie_word_embeddings
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert ours.options.rotary_dim == int(ref.head_dim * ref.rope_parameters["partial_rotary_factor"]) == 64
    assert ours.qk_norm and not ours.attention_bias and not ours.mlp_bias
    assert ours.options.norm_plus_one and not ours.options.gated_delta_net.fused_projections
    assert_hybrid_shape(ours, ref)
    assert ours.num_cache_layers == 8


def test_qwen3_5_wrapper_reads_its_text_config_and_ties_by_its_own_key():
    text = {"hidden_size": 64, "num_hidden_layers": 3, "full_attention_interval": 3, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True}}
    c = {"architectures": [QWEN3_5_WRAPPED], "model_type": "qwen3_5", "text_config": text, "dtype": "bfloat16"}
    ours, ref = ModelConfig.from_hf(c), hf_config("Qwen3_5Config", c)
    assert ours.architecture == QWEN3_5_WRAPPED and ours.family == "qwen3_5" and ours.dtype == "bfloat16"
    assert ours.hidden_size == ref.text_config.hidden_size == 64
    assert ours.tie_word_embeddings == ref.tie_word_embeddings is False  # the wrapper's, not the text's
    assert ours.options.rotary_dim == 128
    assert_hybrid_shape(ours, ref.text_config)
    assert ModelConfig.from_hf({**c, "tie_word_embeddings": True}).tie_word_embeddings


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"sliding_window": 8, "use_sliding_window": True}, "sliding windows"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 4]}}, "mrope_section"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"layer_types": ["linear_attention", "sliding_attention"]}, "layer_types"),
])
def test_qwen3_5_refusals_name_the_option(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({"architectures": [QWEN3_5], "num_hidden_layers": 2, **extra})


def test_qwen3_5_tensor_parallel_splits_the_gated_delta_net_heads():
    """Each rank: half the key and value heads, and states of its heads only;
    head counts the degree does not divide are refused by their keys."""
    local = ShardPlan(ModelConfig.from_hf({"architectures": [QWEN3_5], "num_hidden_layers": 4}), 2, 1).local_config()
    s = local.options.gated_delta_net
    assert (s.num_k_heads, s.num_v_heads) == (8, 16)
    assert local.options.hybrid.states == s.states()
    assert local.options.hybrid.states[1].shape == (16, 128, 128)
    odd = ModelConfig.from_hf({"architectures": [QWEN3_5], "num_hidden_layers": 4, "linear_num_key_heads": 2,
                               "linear_num_value_heads": 6})
    with pytest.raises(TensorParallelConfigError,
                       match=r"linear_num_key_heads \(2\) is not a multiple.*linear_num_value_heads \(6\)"):
        check(odd, 4)


def test_qwen3_5_text_positions_turn_as_plain_rope():
    """transformers' interleaved multimodal table, every axis at the text position,
    is the plain partial RoPE table the engine builds."""
    import transformers
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    kwargs = variant_kwargs("qwen3_5", 100)
    ref = Qwen3_5TextRotaryEmbedding(transformers.Qwen3_5TextConfig(**kwargs))
    positions = torch.arange(200)
    cos, sin = ref(torch.zeros(1, dtype=torch.float32), positions[None, None].expand(3, 1, -1))
    ours = build_cos_sin_cache(ModelConfig.from_hf({"architectures": [QWEN3_5], **kwargs}))
    half = ours.shape[1] // 2
    assert ours.shape[1] == cos.shape[-1] == 8
    torch.testing.assert_close(ours[:200, :half], cos[0, :, :half], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:200, half:], sin[0, :, :half], rtol=0, atol=1e-6)


def write_wrapper(out, tokenizer_dir, vocab: int, variant: str, wrapper_config: str, wrapper: str,
                  vision_config: str, seed: int):
    """``variant``'s text model inside its multimodal ``wrapper`` with a one-block
    vision tower, tied embeddings (the wrapper's key), saved as transformers saves it."""
    import transformers

    text = {k: v for k, v in variant_kwargs(variant, vocab).items() if k not in ("pad_token_id",)}
    vision = getattr(transformers, vision_config)(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                                  out_hidden_size=COMMON["hidden_size"],
                                                  num_position_embeddings=16)
    config = getattr(transformers, wrapper_config)(text_config=text, vision_config=vision.to_dict(),
                                                   tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = getattr(transformers, wrapper)(config).eval()
    ref.save_pretrained(str(out), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((tokenizer_dir / f).read_bytes())
    return ref


@torch.no_grad()
def wrapper_matches(path, ref) -> None:
    """LLMEngine on the wrapper checkpoint: transformers' greedy tokens and prompt logprobs."""
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=4, max_num_batched_tokens=8))
    assert eng.model_cfg.tie_word_embeddings
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    for prompt, out in zip(PROMPTS, eng.generate(PROMPTS, params)):
        ids = ref.generate(torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ids[0, len(prompt):].tolist()
        logits = ref(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        want = logits[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_qwen3_5_wrapper_checkpoint_serves_its_text_model(tmp_path, tiny_tokenizer_dir, tiny_checkpoints):
    ref = write_wrapper(tmp_path, tiny_tokenizer_dir, tiny_checkpoints.vocab_size, "qwen3_5", "Qwen3_5Config",
                        QWEN3_5_WRAPPED, "Qwen3_5VisionConfig", 231)
    wrapper_matches(tmp_path, ref)


def test_qwen3_5_moe_defaults_as_transformers_reads_them():
    c = {"architectures": [QWEN3_5_MOE]}
    ours, ref = ModelConfig.from_hf(c), hf_config("Qwen3_5MoeTextConfig", c)
    assert ours.family == "qwen3_5_moe"
    assert (ours.vocab_size, ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        ref.vocab_size, ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
        ref.head_dim) == (248320, 2048, 40, 16, 2, 256)
    m = ours.moe
    assert (m.num_experts, m.top_k, m.expert_intermediate_size, m.shared_expert_intermediate_size) == (
        ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size, ref.shared_expert_intermediate_size)
    assert m.renormalize and all(m.sparse_layers) and len(m.sparse_layers) == 40
    assert ours.options.rotary_dim == 64 and not ours.tie_word_embeddings
    assert_hybrid_shape(ours, ref)


def test_qwen3_5_moe_reads_no_dense_layer_keys():
    """Its config has no decoder_sparse_step, mlp_only_layers or norm_topk_prob: every
    layer sparse, every top-k renormalised, whatever config.json holds."""
    c = {"architectures": [QWEN3_5_MOE], "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2,
         "mlp_only_layers": [1], "decoder_sparse_step": 2, "norm_topk_prob": False}
    m = ModelConfig.from_hf(c).moe
    assert m.renormalize and m.sparse_layers == (True,) * 4 and m.num_experts == 4


def fuse_experts(src, out, prefix: str = "model.language_model.") -> None:
    """``src``'s checkpoint rewritten with each layer's experts fused ([E, 2I, hidden]
    gate_up_proj, rows [gate | up]; [E, hidden, I] down_proj) and its text tensors
    under ``prefix``."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    experts, tensors = {}, {}
    for name, t in load_file(str(out / "model.safetensors")).items():
        name = prefix + name[len("model."):] if name.startswith("model.") else name
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if m is None:
            tensors[name] = t
        else:
            experts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = t
    for base, projs in experts.items():
        stacked = {p: torch.stack([w[e] for e in sorted(w)]) for p, w in projs.items()}
        tensors[f"{base}.gate_up_proj"] = torch.cat([stacked["gate_proj"], stacked["up_proj"]], dim=1)
        tensors[f"{base}.down_proj"] = stacked["down_proj"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def test_qwen3_5_moe_fused_experts_under_the_wrapper_prefix(tmp_path, tiny_checkpoints):
    src = tiny_checkpoints["qwen3_5_moe"]
    fuse_experts(src, tmp_path / "fused")
    eng = LLMEngine(EngineConfig(model=str(tmp_path / "fused"), num_blocks=64, block_size=4,
                                 max_num_batched_tokens=8))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(PROMPTS, params)] == hf_greedy(hf_model(src), PROMPTS, 4)


def test_qwen3_5_moe_wrapper_reads_its_text_config():
    """Its checkpoints load as the dense wrapper's do (the fused-experts test reads one
    under model.language_model.); its config.json is its text_config."""
    text = {"hidden_size": 64, "num_hidden_layers": 2, "full_attention_interval": 2, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 16, "tie_word_embeddings": True}
    c = {"architectures": [QWEN3_5_MOE_WRAPPED], "model_type": "qwen3_5_moe", "text_config": text}
    ours, ref = ModelConfig.from_hf(c), hf_config("Qwen3_5MoeConfig", c)
    assert ours.architecture == QWEN3_5_MOE_WRAPPED and ours.family == "qwen3_5_moe"
    assert (ours.moe.num_experts, ours.moe.top_k, ours.moe.expert_intermediate_size) == (
        ref.text_config.num_experts, ref.text_config.num_experts_per_tok, ref.text_config.moe_intermediate_size)
    assert ours.tie_word_embeddings == ref.tie_word_embeddings is False
    assert_hybrid_shape(ours, ref.text_config)


def test_olmo_hybrid_defaults_as_transformers_reads_them():
    c = {"architectures": [OLMO_HYBRID]}
    ours, ref = ModelConfig.from_hf(c), hf_config("OlmoHybridConfig", c)
    assert ours.family == "olmo_hybrid" and ours.moe is None
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads,
            ours.num_kv_heads) == (ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers,
                                   ref.num_attention_heads, ref.num_key_value_heads) == (100352, 3840, 11008, 32, 30, 30)
    assert ours.head_dim == ref.hidden_size // ref.num_attention_heads == 128
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.tie_word_embeddings == ref.tie_word_embeddings
    assert ours.eos_token_ids == (ref.eos_token_id,) and ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert ours.qk_norm and not ours.attention_bias and not ours.o_proj_bias and not ours.mlp_bias
    o = ours.options
    assert o.post_norms and o.full_qk_norm and o.norm_fp32_product and not o.norm_plus_one
    assert o.rotary_dim is None and o.nope_layers == ()
    assert_hybrid_shape(ours, ref)
    assert (o.gated_delta_net.beta_scale, o.gated_delta_net.norm_eps) == (2.0, 1e-5)
    # fewer than four layers: the last one attends
    c = {"architectures": [OLMO_HYBRID], "num_hidden_layers": 3}
    assert_hybrid_shape(ModelConfig.from_hf(c), hf_config("OlmoHybridConfig", c))


def test_olmo_hybrid_options():
    c = {"architectures": [OLMO_HYBRID], "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
         "head_dim": 32, "linear_allow_neg_eigval": False}
    ours = ModelConfig.from_hf(c)
    assert ours.head_dim == 32  # its attention reads a head_dim config.json holds
    assert ours.options.gated_delta_net.beta_scale == 1.0
    nope = ModelConfig.from_hf({**c, "rope_parameters": {"rope_type": "default", "rope_theta": None}})
    assert nope.options.nope_layers == (3,)
    assert ModelConfig.from_hf({**c, "rope_theta": None}).options.nope_layers == (3,)
    assert ModelConfig.from_hf({**c, "rope_parameters": None}).options.nope_layers == ()


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"layer_types": ["linear_attention"] * 2}, "both full_attention and linear_attention"),
    ({"layer_types": ["linear_attention", "sliding_attention"]}, "layer_types"),
    ({"linear_conv_kernel_dim": 1}, "linear_conv_kernel_dim"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_olmo_hybrid_refusals_name_the_option(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({"architectures": [OLMO_HYBRID], "num_hidden_layers": 2, **extra})
    with pytest.raises(TensorParallelConfigError, match="Gated DeltaNet"):
        check(ModelConfig.from_hf({"architectures": [OLMO_HYBRID], "num_hidden_layers": 4}), 2)


def test_olmo_hybrid_without_rope_matches_transformers(tmp_path, tiny_tokenizer_dir, tiny_checkpoints):
    """A null rope_theta (the released checkpoints'): no layer rotates, in transformers and here."""
    kwargs = {**variant_kwargs("olmo_hybrid", tiny_checkpoints.vocab_size),
              "rope_parameters": {"rope_type": "default", "rope_theta": None}}
    path = write_hf_checkpoint(tmp_path / "nope", "OlmoHybridConfig", kwargs, 234, {}, tiny_tokenizer_dir)
    ref = hf_model(path)
    assert ref.model.rotary_emb is None
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=4, max_num_batched_tokens=8))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(PROMPTS, params)] == hf_greedy(ref, PROMPTS, 4)
