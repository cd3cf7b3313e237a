"""config.json parsing of the GLM-4, Cohere 2, Nemotron and Arcee families:
the defaults transformers' config classes fill in, the options read, the
LayerNorm1P and relu2 pieces against transformers' own, and a clear
CheckpointError for what the engine does not support; Nemotron's and
Arcee's LoRA stacks (PEFT parity in test_lora_engine). Token parity is in
test_model_parity / test_engine_parity (variants glm4, cohere2, nemotron,
arcee), at tensor_parallel_size 2 in test_tp_engine, and Cohere 2's live
hand-off in tests/integration/test_family_handoff.py."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.layers import LayerNorm
from splitserve.engine.models.nemotron import PlusOneSlot
from splitserve.engine.models.plain_blocks import PlainMLP
from splitserve.engine.parallel.plan import TensorParallelConfigError, check


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, **extra}


def test_glm4_defaults():
    cfg = ModelConfig.from_hf(raw("Glm4ForCausalLM"))
    # no head_dim key: 128, half of it rotating in adjacent pairs, as GLM's
    assert cfg.family == "glm4" and cfg.head_dim == 128 and cfg.options.rotary_dim == 64
    assert cfg.options.interleaved_rope and cfg.rms_norm_eps == 1.5625e-7
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, False, False)
    assert cfg.eos_token_ids == (151329, 151336, 151338) and not cfg.tie_word_embeddings
    check(cfg, 2)  # splits: test_tp_engine checks its tokens at TP=2


def test_cohere2_layer_types_windows_and_nope_layers():
    # without layer_types: every 4th layer (sliding_window_pattern) full attention, no RoPE;
    # head_dim always hidden_size / heads; RoPE base 10000 (not Cohere's 500000)
    cfg = ModelConfig.from_hf(raw("Cohere2ForCausalLM", num_hidden_layers=5, head_dim=8))
    assert cfg.family == "cohere2" and cfg.head_dim == 16 and cfg.rope_theta == 10000.0
    assert cfg.layer_windows == (4096, 4096, 4096, 0, 4096) and cfg.options.nope_layers == (3,)
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5 and cfg.options.logit_scale == 0.0625
    assert cfg.options.float_layer_norm == "cohere" and cfg.options.parallel_residual
    assert not cfg.options.head_qk_layer_norm and not cfg.qk_norm
    cfg = ModelConfig.from_hf(raw("Cohere2ForCausalLM", num_hidden_layers=3, sliding_window_pattern=2,
                                  sliding_window=8, attention_bias=True, rope_theta=50.0))
    assert cfg.layer_windows == (8, 0, 8) and cfg.options.nope_layers == (1,) and cfg.rope_theta == 50.0
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, False)
    cfg = ModelConfig.from_hf(raw("Cohere2ForCausalLM", sliding_window=None,
                                  layer_types=["full_attention", "full_attention"]))
    assert cfg.layer_windows == (0, 0) and cfg.options.nope_layers == (0, 1)


def test_nemotron_defaults():
    # its eps is norm_eps (rms_norm_eps is not read), half of each head rotates (rotate-half)
    cfg = ModelConfig.from_hf(raw("NemotronForCausalLM", rms_norm_eps=0.5))
    assert cfg.family == "nemotron" and cfg.rms_norm_eps == 1e-5 and cfg.head_dim == 16
    opts = cfg.options
    assert (opts.hidden_act, opts.plain_mlp, opts.layer_norm) == ("relu2", ("up_proj", "down_proj"), True)
    assert opts.rotary_dim == 8 and not opts.interleaved_rope
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.tie_word_embeddings) == (2, (3,), False)
    cfg = ModelConfig.from_hf(raw("NemotronForCausalLM", norm_eps=1e-3, attention_bias=True, mlp_bias=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 1.0}))
    assert cfg.rms_norm_eps == 1e-3 and cfg.options.rotary_dim is None
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)
    check(cfg, 2)  # its LayerNorm1Ps whole on every rank, heads and MLP split
    with pytest.raises(TensorParallelConfigError, match="NemotronForCausalLM cannot run at tensor_parallel_size 3"):
        check(cfg, 3)


def test_arcee_defaults():
    cfg = ModelConfig.from_hf(raw("ArceeForCausalLM"))
    assert cfg.family == "arcee" and cfg.rms_norm_eps == 1e-5 and not cfg.options.layer_norm
    assert (cfg.options.hidden_act, cfg.options.plain_mlp) == ("relu2", ("up_proj", "down_proj"))
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.max_position) == (128000, (128001,), 256)
    cfg = ModelConfig.from_hf(raw("ArceeForCausalLM", attention_bias=True, mlp_bias=True, rms_norm_eps=1e-3))
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias, cfg.rms_norm_eps) == (True, True, True, 1e-3)
    check(cfg, 2)  # splits: test_tp_engine checks its tokens at TP=2


@pytest.mark.parametrize("arch, extra, match", [
    ("Glm4ForCausalLM", {"quantization_config": {"quant_method": "fp8"}},
     "fp8 Glm4ForCausalLM checkpoints are not supported"),
    ("Cohere2ForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    ("Cohere2ForCausalLM", {"rope_parameters": {"full_attention": {"rope_theta": 1.0},
                                                "sliding_attention": {"rope_theta": 2.0}}},
     "rope_parameters nested by layer type"),
    ("Cohere2ForCausalLM", {"sliding_window": None}, "sliding_window is null"),
    ("Cohere2ForCausalLM", {"layer_types": ["sliding_attention"]}, "layer_types has 1 entries for 2"),
    ("Cohere2ForCausalLM", {"layer_types": ["chunked_attention"] * 2}, "chunked_attention"),
    ("Cohere2ForCausalLM", {"quantization_config": {"quant_method": "fp8"}},
     "fp8 Cohere2ForCausalLM checkpoints are not supported"),
    ("NemotronForCausalLM", {"hidden_act": "relu6"}, "hidden_act 'relu6' is not supported for nemotron"),
    ("NemotronForCausalLM", {"partial_rotary_factor": 0.1}, "gives 1 rotated dims of 16"),
    ("ArceeForCausalLM", {"hidden_act": "xielu"}, "hidden_act 'xielu' is not supported for arcee"),
])
def test_unsupported_options_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_1p_and_relu2_match_transformers(dtype):
    from transformers.activations import ACT2FN
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P

    x = (torch.randn(5, 16) * 3 + 1).to(dtype)
    ref = NemotronLayerNorm1P(16, eps=1e-3).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(0.3 * torch.randn(16))
        ref.bias.copy_(0.3 * torch.randn(16))
    ours = LayerNorm(16, 1e-3, dtype, "cpu")
    PlusOneSlot(ours.weight).load("norm.weight", ref.weight.detach())
    ours.bias.data.copy_(ref.bias)
    torch.testing.assert_close(ours(x)[0], ref(x), atol=0, rtol=0)  # the same op on the same weights
    cfg = ModelConfig.from_hf(raw("ArceeForCausalLM"))
    assert torch.equal(PlainMLP(cfg, dtype, "cpu", "mlp").act(x), ACT2FN["relu2"](x))


def test_glm4_takes_lora_on_attention_and_its_fused_gate_up(tiny_checkpoints):
    # its gate_up_proj adapters land on the gate and up parts (PEFT parity: test_lora_engine)
    model = load_model(load_checkpoint(tiny_checkpoints["glm4"]), torch.float32)
    assert {name for _, name in model.enable_lora(2, 4)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("variant", ["nemotron", "arcee"])
def test_ungated_mlp_takes_lora(tiny_checkpoints, variant):
    # the attention's and the ungated MLP's stacks (PEFT parity: test_lora_engine)
    model = load_model(load_checkpoint(tiny_checkpoints[variant]), torch.float32)
    assert {name for _, name in model.enable_lora(2, 4)} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                             "up_proj", "down_proj"}
