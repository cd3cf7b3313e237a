"""config.json parsing of FlexOlmo: the defaults transformers' config class
fills in, the options read, and a clear CheckpointError (or tensor parallel
refusal) for what the engine does not support. Token parity is in
test_moe_parity."""

from __future__ import annotations

import pytest

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.parallel.plan import TensorParallelConfigError, check


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, **extra}


def test_flex_olmo_defaults_and_options():
    m = ModelConfig.from_hf(raw("FlexOlmoForCausalLM"))
    assert m.family == "flex_olmo" and m.rms_norm_eps == 1e-6 and m.rope_theta == 500000.0
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (7, 5, 128)
    assert not m.moe.renormalize and not m.moe.grouped_sigmoid and m.moe.sparse_layers == (True, True)
    assert m.qk_norm and m.options.full_qk_norm and m.options.post_norms and m.options.norm_fp32_product
    m = ModelConfig.from_hf(raw("FlexOlmoForCausalLM", num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True, attention_bias=True, head_dim=32))
    assert m.moe.renormalize and m.attention_bias and m.o_proj_bias and not m.mlp_bias
    assert m.head_dim == 32


@pytest.mark.parametrize("arch, extra, match", [
    ("FlexOlmoForCausalLM", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for flex_olmo"),
    ("FlexOlmoForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
])
def test_unsupported_options_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


@pytest.mark.parametrize("arch", ["FlexOlmoForCausalLM"])
def test_all_head_qk_norms_refuse_tensor_parallel(arch):
    with pytest.raises(TensorParallelConfigError, match="normalise across all heads"):
        check(ModelConfig.from_hf(raw(arch, num_key_value_heads=2)), 2)
