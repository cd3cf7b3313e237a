"""Mamba-1 families (Mamba, Falcon-Mamba, Jamba): config.json read as
transformers' config classes read it (their defaults, the original
checkpoints' keys), the original checkpoints' tensor names, a Jamba without
experts, and what is refused. Token parity through LLMEngine (chunked
prefill, preemption, speculative decoding, the hand-off of a model with no
KV cache layer) is in test_hybrid_parity."""

from __future__ import annotations

import pytest

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.parallel.plan import TensorParallelConfigError, check

MAMBA, FALCON, JAMBA = "MambaForCausalLM", "FalconMambaForCausalLM", "JambaForCausalLM"
# config.json in state-spaces' original format (mamba_ssm's MambaConfig)
ORIGINAL = {"architectures": [MAMBA], "d_model": 96, "n_layer": 3, "vocab_size": 50277,
            "ssm_cfg": {"d_state": 8, "d_conv": 3}, "rms_norm": True, "residual_in_fp32": False,
            "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": False}


def reference(arch: str):
    import transformers

    return (transformers.MambaConfig if arch == MAMBA else transformers.FalconMambaConfig)()


@pytest.mark.parametrize("arch", [MAMBA, FALCON])
def test_defaults_match_transformers(arch):
    cfg, ref = ModelConfig.from_hf({"architectures": [arch]}), reference(arch)
    shape, opts = cfg.options.mamba, cfg.options
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (
        ref.hidden_size, ref.num_hidden_layers, ref.vocab_size, ref.layer_norm_epsilon, ref.tie_word_embeddings)
    assert (shape.inner, shape.state_size, shape.conv_kernel, shape.dt_rank) == (
        ref.intermediate_size, ref.state_size, ref.conv_kernel, ref.time_step_rank)
    assert (shape.conv_bias, shape.proj_bias, opts.residual_in_fp32) == (
        ref.use_conv_bias, ref.use_bias, ref.residual_in_fp32)
    assert shape.dt_norms == ("weightless" if arch == FALCON else "")
    if arch == FALCON:
        assert shape.dt_norm_eps == ref.mixer_rms_eps
    assert cfg.num_cache_layers == 0 and cfg.kv_bytes_per_token(cfg.torch_dtype) == 0
    assert [s.name for s in opts.hybrid.states] == ["conv", "ssm"]


def test_original_format_config():
    cfg = ModelConfig.from_hf(ORIGINAL)
    shape = cfg.options.mamba
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.tie_word_embeddings) == (96, 3, 50280, False)
    assert (shape.inner, shape.state_size, shape.conv_kernel, shape.dt_rank) == (192, 8, 3, 6)
    assert not cfg.options.residual_in_fp32


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"conv_kernel": 1}, "taps"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"ssm_cfg": {"layer": "Mamba2"}}, "ssm_cfg layer"),
    ({"ssm_cfg": {"d_state": 8, "ngroups": 2}}, "ssm_cfg keys"),
    ({"rms_norm": False}, "rms_norm"),
])
def test_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({"architectures": [MAMBA], **extra})


def test_tensor_parallelism_and_lora_are_refused(tiny_checkpoints):
    with pytest.raises(TensorParallelConfigError, match="Mamba layers are not sharded"):
        check(ModelConfig.from_hf({"architectures": [FALCON]}), 2)
    with pytest.raises(Exception, match="LoRA adapters are not supported"):
        LLMEngine(EngineConfig(model=str(tiny_checkpoints["mamba"]), num_blocks=32, block_size=4, max_loras=1))


def test_original_checkpoint_names_load(tiny_checkpoints, tmp_path):
    # the original checkpoints' ``backbone.embedding`` (transformers' load hook renames it)
    import shutil

    from safetensors.torch import load_file, save_file

    from splitserve.engine.sampling_params import SamplingParams
    from tests.fixtures.checkpoints import hf_greedy, hf_model

    src = tiny_checkpoints["mamba"]
    dst = tmp_path / "original"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    prompt = [5, 9, 13, 17, 21]
    want = hf_greedy(hf_model(src), [prompt], 4)
    eng = LLMEngine(EngineConfig(model=str(dst), num_blocks=32, block_size=4))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate([prompt], params)] == want


@pytest.mark.parametrize("raw", [{}, {"num_hidden_layers": 6, "num_key_value_heads": None, "num_local_experts": 4,
                                      "attn_layer_period": 3, "attn_layer_offset": 0, "expert_layer_period": 3,
                                      "expert_layer_offset": 2, "mamba_dt_rank": 12, "mamba_expand": 3}],
                         ids=["defaults", "periods"])
def test_jamba_config_matches_transformers(raw):
    import transformers

    from splitserve.engine.hybrid_config import ATTENTION

    cfg = ModelConfig.from_hf({"architectures": [JAMBA], **raw})
    ref = transformers.JambaConfig(**{k: v for k, v in raw.items() if v is not None})
    if "num_key_value_heads" in raw:  # null: the head count, as JambaConfig's __post_init__ sets it
        ref.num_key_value_heads = ref.num_attention_heads
    shape, moe = cfg.options.mamba, cfg.moe
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps,
            cfg.max_position, cfg.tie_word_embeddings) == (
        ref.hidden_size, ref.num_hidden_layers, ref.vocab_size, ref.num_attention_heads, ref.num_key_value_heads,
        ref.rms_norm_eps, ref.max_position_embeddings, ref.tie_word_embeddings)
    assert cfg.options.hybrid.layer_kinds == tuple(ATTENTION if t == "attention" else "mamba"
                                                   for t in ref.layers_block_type)
    assert moe.sparse_layers == tuple(n > 1 for n in ref.layers_num_experts)
    assert (moe.num_experts, moe.top_k, moe.renormalize, moe.expert_intermediate_size) == (
        ref.num_experts, ref.num_experts_per_tok, False, ref.intermediate_size)
    assert (shape.inner, shape.state_size, shape.conv_kernel, shape.dt_rank, shape.dt_norms) == (
        ref.mamba_expand * ref.hidden_size, ref.mamba_d_state, ref.mamba_d_conv, ref.mamba_dt_rank, "weighted")
    assert (shape.conv_bias, shape.proj_bias, shape.dt_norm_eps) == (
        ref.mamba_conv_bias, ref.mamba_proj_bias, ref.rms_norm_eps)
    assert cfg.num_cache_layers == ref.layers_block_type.count("attention")


@pytest.mark.parametrize("extra, match", [
    ({"attn_layer_offset": 8}, "attn_layer_offset"),
    ({"expert_layer_offset": 2}, "expert_layer_offset"),
    ({"attn_layer_period": 1, "attn_layer_offset": 0}, "recurrent layer"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"mamba_d_conv": 1}, "taps"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_jamba_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({"architectures": [JAMBA], **extra})
    with pytest.raises(TensorParallelConfigError, match="Mamba layers are not sharded"):
        check(ModelConfig.from_hf({"architectures": [JAMBA]}), 2)


def test_jamba_without_experts(tiny_checkpoints, tmp_path):
    # num_experts 1: every layer's MLP dense (transformers' JambaMLP), no sparse block
    from splitserve.engine.sampling_params import SamplingParams
    from tests.fixtures.checkpoints import hf_greedy, hf_model, variant_kwargs, write_hf_checkpoint

    kwargs = {**variant_kwargs("jamba", tiny_checkpoints.vocab_size), "num_experts": 1}
    path = write_hf_checkpoint(tmp_path / "dense", "JambaConfig", kwargs, 253, {},
                               tiny_checkpoints.tokenizer_dir)
    prompts = [[5, 9, 13], list(range(20, 37))]
    want = hf_greedy(hf_model(path), prompts, 4)
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=32, block_size=4, max_num_batched_tokens=8))
    assert eng.model_cfg.moe is None
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, params)] == want


def test_scan_blocks_match_step_by_step():
    # a prompt over three scan blocks from a nonzero state, against one step at a time
    import torch

    from splitserve.engine.models.mamba1 import SCAN_BLOCK, scan

    gen = torch.Generator().manual_seed(254)
    n, inner, size = 2 * SCAN_BLOCK + 5, 6, 4
    u = torch.randn(n, 1, inner, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(n, 1, inner, generator=gen))
    B, C = (torch.randn(n, 1, size, generator=gen) for _ in range(2))
    A = -torch.rand(inner, size, generator=gen) * 2
    state = torch.randn(1, inner, size, generator=gen)
    y, states = scan(u, dt, B, C, A, state, keep_all=True)
    s = state
    for t in range(n):
        out, s = scan(u[t], dt[t], B[t], C[t], A, s, keep_all=False)
        torch.testing.assert_close(y[t], out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(states[t], s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scan(u, dt, B, C, A, state, keep_all=False)[1], s)


def test_mamba_bf16_prompt_logprobs_near_transformers(tmp_path, tiny_checkpoints):
    # both sides in bf16: the residual stream in float32 (residual_in_fp32) between bf16 layers,
    # the conv state in bf16, the scan's state in float32, D and the gate in float32 over a
    # prompt, as transformers rounds them (equal, measured). Without in_proj / out_proj biases
    # (Mamba's default): biased bf16 projections round their sum apart from transformers' (0.03)
    import torch
    import transformers

    from splitserve.engine.sampling_params import SamplingParams
    from tests.fixtures.checkpoints import VARIANTS, variant_kwargs, write_hf_checkpoint

    cls, _, seed, _ = VARIANTS["mamba"]
    kwargs = {**variant_kwargs("mamba", tiny_checkpoints.vocab_size), "use_bias": False}
    path = write_hf_checkpoint(tmp_path / "bf16", cls, kwargs, seed, {"dtype": torch.bfloat16},
                               tiny_checkpoints.tokenizer_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    prompt = [(i * 37) % 400 + 3 for i in range(40)]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    want = logits[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    eng = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", num_blocks=32, block_size=4,
                                 max_num_batched_tokens=16))
    out = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    assert (got - want).abs().max().item() < 0.01


def test_mamba2_defaults_match_transformers():
    import transformers

    ref = transformers.Mamba2Config()
    cfg = ModelConfig.from_hf({"architectures": ["Mamba2ForCausalLM"]})
    shape = cfg.options.mamba2
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (
        ref.hidden_size, ref.num_hidden_layers, ref.vocab_size, ref.layer_norm_epsilon, ref.tie_word_embeddings)
    assert (shape.num_heads, shape.head_dim, shape.n_groups, shape.state_size, shape.conv_kernel) == (
        ref.num_heads, ref.head_dim, ref.n_groups, ref.state_size, ref.conv_kernel)
    assert (shape.conv_bias, shape.proj_bias, cfg.options.residual_in_fp32) == (
        ref.use_conv_bias, ref.use_bias, ref.residual_in_fp32)
    assert shape.time_step_limit == tuple(ref.time_step_limit) and not shape.norm_before_gate
    assert cfg.num_cache_layers == 0 and [s.name for s in cfg.options.hybrid.states] == ["conv", "ssm"]


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_heads": 64}, "num_heads 64 x head_dim 64 must equal"),
    ({"conv_kernel": 1}, "taps"),
    ({"n_groups": 3}, "must divide"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_mamba2_refusals(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({"architectures": ["Mamba2ForCausalLM"], **extra})
