"""GLM-4.5 (glm4_moe) and dots.llm1 (dots1): the grouped sigmoid router
against transformers' own router modules, config.json defaults and the
options read, what is refused, the multi-token-prediction layers skipped at
load, LoRA and tensor-parallel limits, and that the variants' correction
bias, expert groups and scaling factor each move the logits. Token parity
is in test_moe_parity."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.config import EngineConfig, ModelConfig, MoEConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.lora.adapter import AdapterError, parse_adapter_config
from splitserve.engine.lora.layout import adapter_layout
from splitserve.engine.models.glm4_moe import Glm4MoeCausalLM
from splitserve.engine.models.grouped_router import route_grouped
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.engine.models.rope import build_cos_sin_cache
from splitserve.engine.parallel.plan import check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 16, **extra}


def _sorted(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # top-k unsorted on both sides: compare each token's experts in id order
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


@pytest.mark.parametrize("family", ["glm4_moe", "dots1"])
@pytest.mark.parametrize("groups, kept, top_k, norm, scale", [
    (1, 1, 4, True, 1.0), (4, 2, 3, False, 2.5), (8, 3, 5, True, 0.7)])
def test_router_matches_transformers(family, groups, kept, top_k, norm, scale):
    import transformers
    from transformers.models.dots1.modeling_dots1 import Dots1TopkRouter
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    config_cls, router_cls = {"glm4_moe": (transformers.Glm4MoeConfig, Glm4MoeTopkRouter),
                              "dots1": (transformers.Dots1Config, Dots1TopkRouter)}[family]
    hf_cfg = config_cls(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=16,
                        n_group=groups, topk_group=kept, num_experts_per_tok=top_k, norm_topk_prob=norm,
                        routed_scaling_factor=scale, n_shared_experts=1)
    router = router_cls(hf_cfg)
    gen = torch.Generator().manual_seed(110)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=gen) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.3)
    x = torch.randn(64, 32, generator=gen)
    _, want_w, want_ids = router(x)
    moe = MoEConfig(num_experts=16, top_k=top_k, expert_intermediate_size=8, renormalize=norm,
                    sparse_layers=(True,), grouped_sigmoid=True, num_groups=groups, topk_groups=kept,
                    routed_scaling_factor=scale)
    w, ids = _sorted(*route_grouped(F.linear(x, router.weight), router.e_score_correction_bias, moe))
    want_w, want_ids = _sorted(want_w, want_ids)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=0)


def test_router_bias_groups_and_scaling_bind(parity_models):
    # each of them, undone, moves the variant's logits well past the tolerance
    model, ref = parity_models("glm4_moe")
    assert not isinstance(model.layers[0].mlp, SparseMoeBlock)  # first_k_dense_replace
    block = model.layers[1].mlp
    assert block.shared_expert is not None and block.shared_expert_gate is None
    want = hf_logits(ref, PROMPT)
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    bias, moe = block.e_score_correction_bias.data.clone(), block.moe
    for undo in ("bias", "groups", "scale"):
        try:
            if undo == "bias":
                block.e_score_correction_bias.data.zero_()
            else:
                block.moe = dataclasses.replace(
                    moe, **({"num_groups": 1, "topk_groups": 1} if undo == "groups"
                            else {"routed_scaling_factor": 1.0}))
            wrong = run(model, new_cache(model), PROMPT, positions, meta)
        finally:
            block.e_score_correction_bias.data.copy_(bias)
            block.moe = moe
        assert (wrong - want).abs().max() > 100 * ATOL, undo


def test_glm4_moe_defaults_and_options():
    m = ModelConfig.from_hf(raw("Glm4MoeForCausalLM"))
    assert m.family == "glm4_moe" and m.num_kv_heads == 8 and m.rms_norm_eps == 1e-5
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (128, 8, 1408)
    assert m.moe.renormalize and m.moe.sparse_layers == (False, True, True)
    assert m.moe.shared_expert_intermediate_size == 1408 and m.moe.grouped_sigmoid
    assert (m.moe.num_groups, m.moe.topk_groups, m.moe.routed_scaling_factor) == (1, 1, 1.0)
    assert m.options.rotary_dim == 2 and m.options.mtp_layers == 1  # head_dim 4, half rotated
    assert not (m.qk_norm or m.attention_bias or m.o_proj_bias or m.mlp_bias or m.tie_word_embeddings)
    assert m.max_position == 131072 and m.layer_windows == (0, 0, 0)
    m = ModelConfig.from_hf(raw(
        "Glm4MoeForCausalLM", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
        n_shared_experts=2, moe_intermediate_size=32, first_k_dense_replace=2, routed_scaling_factor=2.5,
        norm_topk_prob=False, use_qk_norm=True, attention_bias=True, head_dim=16, num_key_value_heads=4,
        num_nextn_predict_layers=0, sliding_window=4, use_sliding_window=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}))
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (16, 4, 32)
    assert (m.moe.num_groups, m.moe.topk_groups, m.moe.routed_scaling_factor) == (4, 2, 2.5)
    assert not m.moe.renormalize and m.moe.sparse_layers == (False, False, True)
    assert m.moe.shared_expert_intermediate_size == 64 and m.num_kv_heads == 4
    assert m.qk_norm and m.attention_bias and not m.o_proj_bias and m.rope_theta == 1e6
    assert m.options.rotary_dim == 4 and m.options.mtp_layers == 0 and m.layer_windows == (0, 0, 0)
    assert build_cos_sin_cache(m).shape[1] == 4
    assert ModelConfig.from_hf(raw("Glm4MoeForCausalLM", n_shared_experts=0)).moe \
        .shared_expert_intermediate_size == 0


def test_dots1_defaults_and_options():
    m = ModelConfig.from_hf(raw(
        "Dots1ForCausalLM", n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        max_window_layers=1, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}))
    assert m.family == "dots1" and m.num_kv_heads == 16 and m.rms_norm_eps == 1e-6
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (8, 2, 1408)
    assert not m.moe.renormalize and m.moe.sparse_layers == (True,) * 3 and m.moe.grouped_sigmoid
    assert m.qk_norm and m.attention_bias and m.o_proj_bias and not m.mlp_bias
    assert m.layer_windows == (0, 4096, 4096) and m.max_position == 2048
    assert m.options.rotary_dim is None and build_cos_sin_cache(m).shape[1] == 4  # whole head
    m = ModelConfig.from_hf(raw("Dots1ForCausalLM", n_routed_experts=8, num_experts_per_tok=2,
                                sliding_window=None, first_k_dense_replace=1))
    assert m.layer_windows == (0, 0, 0) and m.moe.shared_expert_intermediate_size == 0
    assert m.moe.sparse_layers == (False, True, True)


@pytest.mark.parametrize("arch, extra, match", [
    ("Glm4MoeForCausalLM", {"n_routed_experts": 10, "n_group": 4}, r"n_group \(4\) must split"),
    ("Glm4MoeForCausalLM", {"n_routed_experts": 8, "n_group": 8}, "groups of at least 2"),
    ("Glm4MoeForCausalLM", {"n_routed_experts": 8, "n_group": 2, "topk_group": 3}, "topk_group"),
    ("Glm4MoeForCausalLM", {"n_routed_experts": 8, "n_group": 4, "num_experts_per_tok": 3},
     r"num_experts_per_tok \(3\) at most"),
    ("Glm4MoeForCausalLM", {"routed_scaling_factor": 0}, "routed_scaling_factor must be positive"),
    ("Glm4MoeForCausalLM", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for glm4_moe"),
    ("Glm4MoeForCausalLM", {"quantization_config": {"quant_method": "fp8"}},
     "fp8 Glm4MoeForCausalLM checkpoints"),
    ("Glm4MoeForCausalLM", {"partial_rotary_factor": 0.1, "head_dim": 16}, "partial_rotary_factor"),
    ("Dots1ForCausalLM", {"num_experts_per_tok": 2}, "missing required key 'n_routed_experts'"),
    ("Dots1ForCausalLM", {"n_routed_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
                          "layer_types": ["sliding_attention"] * 3}, "sliding_window is null"),
    ("Dots1ForCausalLM", {"n_routed_experts": 8, "num_experts_per_tok": 2, "hidden_act": "relu"},
     "hidden_act 'relu' is not supported for dots1"),
])
def test_unsupported_options_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


def test_mtp_layers_are_skipped_at_load(tiny_checkpoints):
    from safetensors.torch import load_file

    ck = load_checkpoint(tiny_checkpoints["glm4_moe"])
    cfg = ck.model_config
    assert cfg.options.mtp_layers == 1  # transformers' default, written by its config class
    tensors = load_file(str(ck.weight_files[0]))
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.2.mlp.experts.0.up_proj.weight"] = torch.zeros(32, 64)
    Glm4MoeCausalLM(cfg, torch.float32, "cpu").load_weights(tensors.items())
    none = dataclasses.replace(cfg, options=dataclasses.replace(cfg.options, mtp_layers=0))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.2.eh_proj"):
        Glm4MoeCausalLM(none, torch.float32, "cpu").load_weights(tensors.items())
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # past the MTP layers
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.3.eh_proj"):
        Glm4MoeCausalLM(cfg, torch.float32, "cpu").load_weights(tensors.items())


def test_lora_on_attention_and_dense_layers_only():
    cfg = parse_adapter_config({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "gate_proj"]})
    model = ModelConfig.from_hf(raw("Glm4MoeForCausalLM", n_routed_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32))

    def pair(name: str, out: int) -> dict:
        return {f"base_model.model.model.layers.{name}.lora_A.weight": (4, 64),
                f"base_model.model.model.layers.{name}.lora_B.weight": (out, 4)}

    ok = {**pair("0.self_attn.q_proj", 64), **pair("0.mlp.gate_proj", 128), **pair("1.self_attn.q_proj", 64)}
    assert sorted(adapter_layout(cfg, ok, model, 8).modules) == [(0, "gate_proj"), (0, "q_proj"),
                                                                 (1, "q_proj")]
    for name, match in (("1.mlp.gate_proj", "mixture-of-experts"),
                        ("1.mlp.shared_experts.gate_proj", "MoE experts")):
        with pytest.raises(AdapterError, match=match):
            adapter_layout(cfg, pair(name, 32), model, 8)


def test_tensor_parallel_splits():
    check(ModelConfig.from_hf(raw("Glm4MoeForCausalLM", num_key_value_heads=4)), 2)
    check(ModelConfig.from_hf(raw("Dots1ForCausalLM", n_routed_experts=8, num_experts_per_tok=2,
                                  n_shared_experts=1)), 2)


@pytest.mark.slow
def test_glm4_moe_tp2_greedy_parity(tiny_checkpoints, parity_models):
    # experts, shared expert, dense layer and the float32 router over two ranks (one
    # spawned over gloo), chunked prefill and prefix-cache hits: transformers' greedy tokens
    _, ref = parity_models("glm4_moe")
    prompts = [list(range(20, 37)), [5, 9, 13]]
    want = hf_greedy(ref, prompts, 4)
    eng = LLMEngine(EngineConfig(model=str(tiny_checkpoints["glm4_moe"]), num_blocks=32,
                                 block_size=4, max_num_batched_tokens=8, tensor_parallel_size=2))
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        assert [r.token_ids for r in eng.generate(prompts, params)] == want
        assert eng.generate(prompts[:1], params)[0].token_ids == want[0]
        block = eng.runner.model.layers[1].mlp
        assert block.w_down.shape[2] == 16 and block.shared_expert.intermediate == 16
    finally:
        eng.close()
