"""Mamba-1 families (Mamba, Falcon-Mamba): config.json read as transformers'
config classes read it (their defaults, the original checkpoints' keys),
the original checkpoints' tensor names, and what is refused. Token parity
through LLMEngine (chunked prefill, preemption, speculative decoding, the
hand-off of a model with no KV cache layer) is in test_hybrid_parity."""

from __future__ import annotations

import pytest

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.parallel.plan import TensorParallelConfigError, check

MAMBA, FALCON = "MambaForCausalLM", "FalconMambaForCausalLM"
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
