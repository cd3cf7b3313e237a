"""gpt-oss: config.json read as transformers' GptOssConfig reads it, what
each of its features does to parity (sinks, the clamped SwiGLU, YaRN's
truncate), the experts' CUDA-graph path against the routed one, MXFP4
experts dequantized at load as transformers dequantizes them, and clear
refusals (fp8 checkpoints, LoRA). Token parity is in test_moe_parity and
test_engine_triton_parity."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.gpt_oss import GptOssMoE, clamped_swiglu, route_top_k
from splitserve.engine.models.mxfp4 import FP4_VALUES
from splitserve.engine.models.rope import build_cos_sin_cache
from tests.fixtures.checkpoints import hf_model
from tests.unit.test_model_parity import ATOL, PROMPT, hf_logits, prompt_logits


def raw(**extra) -> dict:
    return {"architectures": ["GptOssForCausalLM"], "vocab_size": 32, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, **extra}


def test_defaults_are_gpt_oss_configs():
    m = ModelConfig.from_hf(raw())
    assert m.family == "gpt_oss" and m.rms_norm_eps == 1e-5 and not m.tie_word_embeddings
    assert (m.head_dim, m.num_kv_heads, m.rope_theta) == (64, 8, 150000.0)
    assert m.attention_bias and m.o_proj_bias and not m.mlp_bias
    assert m.rope_scaling["rope_type"] == "yarn" and m.rope_scaling["factor"] == 32.0
    assert m.rope_scaling["truncate"] is False and m.rope_scaling["original_max_position_embeddings"] == 4096
    assert m.layer_windows == (128, 0)  # sliding first, alternating
    moe = m.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size) == (128, 4, 128)
    assert moe.renormalize and moe.sparse_layers == (True, True) and not moe.shared_expert_intermediate_size
    assert (moe.swiglu_alpha, moe.swiglu_limit) == (1.702, 7.0)
    assert m.options.attention_sinks and m.options.norm_fp32_product


def test_released_config_layout():
    # as openai/gpt-oss-20b writes it (less its quantization_config): rope_scaling and
    # rope_theta at top level, num_local_experts, explicit layer_types
    m = ModelConfig.from_hf(raw(
        num_local_experts=32, num_experts_per_tok=4, head_dim=16, num_key_value_heads=2, sliding_window=128,
        rope_theta=150000, layer_types=["full_attention", "sliding_attention"], swiglu_limit=7.0,
        attention_bias=False, hidden_act="silu", experts_per_token=4, initial_context_length=4096,
        rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "rope_type": "yarn",
                      "original_max_position_embeddings": 4096, "truncate": False}))
    assert m.moe.num_experts == 32 and m.head_dim == 16 and m.num_kv_heads == 2
    assert m.layer_windows == (0, 128) and m.rope_theta == 150000.0
    assert not (m.attention_bias or m.o_proj_bias)
    # a null window: no layer slides (none may be marked sliding)
    none = ModelConfig.from_hf(raw(sliding_window=None, layer_types=["full_attention"] * 2))
    assert none.layer_windows == (0, 0) and none.sliding_window is None


@pytest.mark.parametrize("extra, match", [
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
     "fp8 GptOssForCausalLM checkpoints are not supported"),
    ({"sliding_window": None}, "sliding_window is null but layer_types has sliding_attention"),
    ({"layer_types": ["sliding_attention"]}, "layer_types has 1 entries for 2 layers"),
    ({"layer_types": ["chunked_attention"] * 2}, "layer_types .* not supported for gpt_oss"),
    ({"swiglu_limit": 0}, "swiglu_limit must be a positive number"),
    ({"num_experts_per_tok": 9, "num_local_experts": 8}, "num_experts_per_tok"),
])
def test_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(**extra))


def test_each_feature_moves_the_logits(parity_models):
    # what the gpt_oss checkpoint exercises: undoing any of it breaks parity
    model, ref = parity_models("gpt_oss")
    want = hf_logits(ref, PROMPT)
    torch.testing.assert_close(prompt_logits(model), want, atol=ATOL, rtol=0)
    moes = [layer.mlp for layer in model.layers]
    changes = {
        "sinks": [(layer.self_attn, "sinks", None) for layer in model.layers],
        "swiglu_limit": [(m, "limit", 1e9) for m in moes],
        "swiglu_alpha": [(m, "alpha", 1.702) for m in moes],
    }
    for what, edits in changes.items():
        saved = [getattr(obj, attr) for obj, attr, _ in edits]
        for obj, attr, value in edits:
            setattr(obj, attr, value)
        try:
            assert (prompt_logits(model) - want).abs().max() > 10 * ATOL, what
        finally:
            for (obj, attr, _), value in zip(edits, saved):
                setattr(obj, attr, value)
    truncated = {**model.cfg.rope_scaling, "truncate": True}
    table = build_cos_sin_cache(dataclasses.replace(model.cfg, rope_scaling=truncated))
    assert (table - model.cos_sin_cache).abs().max() > 1e-3  # truncate moves YaRN's ramp


def test_clamped_swiglu_is_transformers_apply_gate():
    gate_up = 4 * torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    gate, up = gate_up[:, ::2].clamp(max=1.5), gate_up[:, 1::2].clamp(-1.5, 1.5)
    want = (up + 1) * gate * torch.sigmoid(gate * 1.3)
    rows = torch.cat([gate_up[:, ::2], gate_up[:, 1::2]], dim=-1)  # de-interleaved at load
    torch.testing.assert_close(clamped_swiglu(rows, 1.3, 1.5), want)


def test_every_expert_path_matches_the_routed_one(parity_models):
    # the path CUDA graph capture takes (no host sync), on CPU
    model, _ = parity_models("gpt_oss")
    moe = model.layers[0].mlp
    assert isinstance(moe, GptOssMoE)
    x = torch.randn(9, model.cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    weights, ids = route_top_k(moe.router(x), moe.top_k)
    torch.testing.assert_close(moe.every_expert(x, weights, ids), moe(x), rtol=1e-5, atol=1e-6)


def test_lora_is_refused(tiny_checkpoints):
    model = load_model(load_checkpoint(tiny_checkpoints["gpt_oss"]), torch.float32)
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for GptOssForCausalLM"):
        model.enable_lora(2, 4)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8): each
    group of 32 scaled by a power of two that fits its largest magnitude in
    e2m1's 6, each value rounded to the nearest code, two codes a byte (low first)."""
    groups = w.float().reshape(*w.shape[:-1], -1, 32)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-100) / 6.0))
    codes = ((groups / 2**exp)[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp[..., 0] + 127).to(torch.uint8)


def test_mxfp4_experts_are_dequantized_at_load(tiny_checkpoints, tmp_path):
    # the fixture's experts in MXFP4 as the released checkpoints store them (rows [out, in]);
    # the reference is transformers' model with transformers' own dequantization of them
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src, out = tiny_checkpoints["gpt_oss"], tmp_path / "gpt_oss_mxfp4"
    shutil.copytree(src, out)
    ref = hf_model(src)
    packed = {}
    for name, t in load_file(out / "model.safetensors").items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            packed[name] = t
            continue
        blocks, scales = quantize_mxfp4(t.transpose(1, 2))
        packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
        with torch.no_grad():
            ref.get_parameter(name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(packed, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    model = load_model(load_checkpoint(out), torch.float32)
    torch.testing.assert_close(prompt_logits(model), hf_logits(ref, PROMPT), atol=ATOL, rtol=0)
    del packed["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(packed, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="without their blocks or scales: .*layers.1.mlp.experts.down_proj_blocks"):
        load_model(load_checkpoint(out), torch.float32)
