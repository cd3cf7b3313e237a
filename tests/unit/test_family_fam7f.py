"""Flint: the config.json defaults read, derived layer kinds, what is
refused (options, fp8 checkpoints, tensor parallelism). Token parity is in
test_moe_parity (variant flint)."""

from __future__ import annotations

import pytest

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.parallel.plan import TensorParallelConfigError, check

FLINT = "FlintForCausalLM"


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, **extra}


def test_flint_defaults():
    cfg = ModelConfig.from_hf(raw(FLINT))
    moe, opts = cfg.moe, cfg.options
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) \
        == (256, 6, 512, 1024)
    assert moe.topk_sigmoid and moe.renormalize and not moe.grouped_sigmoid
    assert moe.sparse_layers == (False, False, True, True, True, True)
    # full attention (no RoPE) on layers 0, 1, 5 (every fourth from 1) and the last
    assert cfg.layer_windows == (0, 0, 513, 513, 513, 0) and opts.nope_layers == (0, 1, 5)
    assert opts.attention_sinks and opts.norm_fp32_product and cfg.qk_norm
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rms_norm_eps) == (128, 4, 1e-6)
    cfg = ModelConfig.from_hf(raw(FLINT, mlp_only_layers=[], decoder_sparse_step=2, attention_bias=True))
    assert cfg.moe.sparse_layers == (False, True) * 3 and cfg.attention_bias and cfg.o_proj_bias


@pytest.mark.parametrize("arch, extra, match", [
    (FLINT, {"hidden_act": "gelu"}, "hidden_act"),
    (FLINT, {"layer_types": ["full_attention"] * 5}, "layer_types"),
    (FLINT, {"sliding_window": None}, "sliding_window"),
    (FLINT, {"quantization_config": {"quant_method": "fp8"}}, f"fp8 {FLINT}"),
])
def test_refusals(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


def test_flint_tensor_parallel_is_refused():
    with pytest.raises(TensorParallelConfigError, match="Flint"):
        check(ModelConfig.from_hf(raw(FLINT)), 2)

