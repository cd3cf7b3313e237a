"""GLM-4.7-Flash (glm4_moe_lite) and Youtu (youtu), multi-head latent
attention beside GLM-4.5's experts and in a dense decoder: config.json
defaults against transformers' config classes, the RoPE table and softmax
scale against transformers' for YaRN with mscale, the dense/sparse layers
of ``mlp_layer_types``, what is refused (LoRA and tensor-parallel sizes
among it), the multi-token-prediction layers skipped at load, that each
variant's distinctive features move the logits, and tensor parallelism at
TP=2 (slow). Token parity is in test_moe_parity (glm4_moe_lite),
test_model_parity and test_engine_parity (youtu)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.models import build_model
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.engine.models.rope import build_cos_sin_cache
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta

LITE, YOUTU = "Glm4MoeLiteForCausalLM", "YoutuForCausalLM"
SHAPE = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 16, **extra}


def hf_config(cfg: dict):
    import transformers

    cls = transformers.Glm4MoeLiteConfig if cfg["architectures"] == [LITE] else transformers.YoutuConfig
    return cls(**{k: v for k, v in cfg.items() if k != "architectures"})


def refused(cfg: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(cfg)


def test_glm4_moe_lite_defaults_as_its_config_class():
    cfg = raw(LITE)
    ours, ref = ModelConfig.from_hf(cfg), hf_config(cfg)
    mla = ours.options.mla
    assert ours.family == "glm4_moe_lite" and ours.num_kv_heads == 1  # the latent, for every head
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) \
        == (ref.q_lora_rank, ref.kv_lora_rank, ref.qk_nope_head_dim, ref.qk_rope_head_dim, ref.v_head_dim) \
        == (768, 512, 192, 64, 256)
    assert ours.head_dim == 512 + 64 and ours.options.rotary_dim == 64 and ours.options.interleaved_rope
    assert ours.options.attn_scale == 256 ** -0.5 and ours.options.mtp_layers == 1
    assert ours.rms_norm_eps == ref.rms_norm_eps == 1e-5
    assert ours.max_position == ref.max_position_embeddings and not ours.tie_word_embeddings
    moe = ours.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size) == (ref.n_routed_experts,
                                                                         ref.num_experts_per_tok,
                                                                         ref.moe_intermediate_size)
    assert moe.grouped_sigmoid and moe.renormalize and (moe.num_groups, moe.topk_groups) == (1, 1)
    assert moe.routed_scaling_factor == ref.routed_scaling_factor == 1.8
    assert moe.shared_expert_intermediate_size == 1536
    assert [("sparse" if s else "dense") for s in moe.sparse_layers] == ref.mlp_layer_types
    assert not (ours.attention_bias or ours.o_proj_bias or ours.mlp_bias or ours.qk_norm)


def test_glm4_moe_lite_options():
    m = ModelConfig.from_hf(raw(LITE, **{**SHAPE, "q_lora_rank": None}, num_local_experts=8,
                                num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=2,
                                moe_intermediate_size=16, mlp_layer_types=["sparse", "dense", "sparse", "dense"],
                                rope_interleave=False, num_nextn_predict_layers=0, attention_bias=True,
                                head_dim=4, norm_topk_prob=False))
    assert m.options.mla.q_lora_rank == 0 and m.head_dim == 20 and not m.options.interleaved_rope
    assert m.moe.num_experts == 8 and m.moe.num_groups == 2 and not m.moe.renormalize
    assert m.moe.sparse_layers == (True, False, True, False) and m.moe.shared_expert_intermediate_size == 32
    assert m.attention_bias and m.o_proj_bias and not m.mlp_bias and m.options.mtp_layers == 0
    # a first_k_dense_replace that agrees with the layer types (GLM-4.7-Flash's config.json has one)
    agreed = ModelConfig.from_hf(raw(LITE, first_k_dense_replace=1, topk_method="noaux_tc"))
    assert agreed.moe.sparse_layers == (False, True, True, True)


@pytest.mark.parametrize("arch, rope", [
    (LITE, {"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0, "mscale": 1.0, "mscale_all_dim": 0.8,
            "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 64}),
    (YOUTU, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0, "mscale": 0.707, "mscale_all_dim": 0.707,
             "original_max_position_embeddings": 32}),
])
def test_rope_table_and_softmax_scale_match_transformers(arch, rope):
    from transformers.models.glm4_moe_lite import modeling_glm4_moe_lite as lite
    from transformers.models.youtu import modeling_youtu as youtu

    cfg = raw(arch, **{**SHAPE, "q_lora_rank": None}, num_attention_heads=4, max_position_embeddings=256,
              rope_parameters=dict(rope))
    hf_cfg = hf_config(cfg)
    attention, rotary = ((lite.Glm4MoeLiteAttention, lite.Glm4MoeLiteRotaryEmbedding) if arch == LITE
                         else (youtu.YoutuAttention, youtu.YoutuRotaryEmbedding))
    cos, sin = rotary(hf_cfg)(torch.zeros(1), torch.arange(256)[None])
    ours = ModelConfig.from_hf(cfg)
    assert ours.options.attn_scale == attention(hf_cfg, 0).scaling != 12 ** -0.5
    table = build_cos_sin_cache(ours)
    assert table.shape == (256, 4)
    torch.testing.assert_close(table[:, :2], cos[0, :, :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(table[:, 2:], sin[0, :, :2], atol=1e-6, rtol=0)


def test_youtu_defaults_as_its_config_class():
    cfg = raw(YOUTU)
    ours, ref = ModelConfig.from_hf(cfg), hf_config(cfg)
    mla = ours.options.mla
    assert ours.family == "youtu" and ours.moe is None and ours.num_kv_heads == 1
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) \
        == (ref.q_lora_rank, ref.kv_lora_rank, ref.qk_nope_head_dim, ref.qk_rope_head_dim, ref.v_head_dim)
    assert ours.head_dim == ref.kv_lora_rank + 64 and ours.options.rotary_dim == ref.head_dim == 64
    assert ours.options.interleaved_rope and ours.options.attn_scale == 192 ** -0.5
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.max_position == ref.max_position_embeddings
    assert ours.tie_word_embeddings and ref.tie_word_embeddings and ours.options.hidden_act == "silu"
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    assert not (ours.attention_bias or ours.o_proj_bias or ours.mlp_bias)
    # what transformers saves (head_dim written as qk_rope_head_dim), and rope_interleave null
    m = ModelConfig.from_hf(raw(YOUTU, **SHAPE, head_dim=4, rope_interleave=None, attention_bias=True,
                                hidden_act="gelu_pytorch_tanh", n_routed_experts=8))
    assert not m.options.interleaved_rope and m.head_dim == 20 and m.moe is None
    assert m.attention_bias and m.o_proj_bias and m.options.hidden_act == "gelu_tanh"


@pytest.mark.parametrize("cfg, match", [
    (raw(LITE, head_dim=32), r"head_dim \(32\) differs from qk_rope_head_dim \(64\)"),
    (raw(LITE, first_k_dense_replace=2), r"first_k_dense_replace \(2\) disagrees with mlp_layer_types"),
    (raw(LITE, mlp_layer_types=["dense", "sparse"]), "mlp_layer_types must give each of the 4 layers"),
    (raw(LITE, mlp_layer_types=["dense", "moe", "sparse", "sparse"]), "one of dense, sparse"),
    (raw(LITE, num_key_value_heads=4), r"num_key_value_heads \(4\) must equal num_attention_heads"),
    (raw(LITE, partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    (raw(LITE, hidden_act="gelu"), "hidden_act 'gelu' is not supported for glm4_moe_lite"),
    (raw(LITE, n_routed_experts=8, n_group=8), "groups of at least 2"),
    (raw(LITE, moe_layer_freq=2), "moe_layer_freq 2 is not supported"),
    (raw(LITE, quantization_config={"quant_method": "fp8"}), f"fp8 {LITE} checkpoints"),
    (raw(YOUTU, head_dim=32), r"head_dim \(32\) differs from qk_rope_head_dim \(64\)"),
    (raw(YOUTU, num_key_value_heads=4), r"num_key_value_heads \(4\) must equal num_attention_heads"),
    (raw(YOUTU, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor 0.5 is not supported"),
    (raw(YOUTU, hidden_act="relu"), "activation 'relu' is not supported for youtu"),
    (raw(YOUTU, qk_rope_head_dim=7, head_dim=7), "qk_rope_head_dim must be even"),
    (raw(YOUTU, quantization_config={"quant_method": "fp8"}), f"fp8 {YOUTU} checkpoints"),
])
def test_unsupported_options_are_refused(cfg, match):
    refused(cfg, match)


@pytest.mark.parametrize("arch", [LITE, YOUTU])
def test_lora_refused_and_tensor_parallel_splits(arch):
    cfg = ModelConfig.from_hf(raw(arch, **SHAPE, n_routed_experts=8, num_experts_per_tok=2,
                                  moe_intermediate_size=32))
    with pytest.raises(CheckpointError, match=f"LoRA adapters are not supported for {arch}"):
        build_model(cfg, torch.float32, "cpu").enable_lora(1, 4)
    check(cfg, 2)
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(16\) is not a multiple"):
        check(cfg, 3)


def test_glm4_moe_lite_mtp_layers_are_skipped_at_load(tiny_checkpoints):
    from safetensors.torch import load_file

    ck = load_checkpoint(tiny_checkpoints["glm4_moe_lite"])
    cfg = ck.model_config
    assert cfg.options.mtp_layers == 1  # no num_nextn_predict_layers key: one, as GLM-4.7-Flash has
    tensors = load_file(str(ck.weight_files[0]))
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    build_model(cfg, torch.float32, "cpu").load_weights(tensors.items())
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # past the MTP layers
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.3.eh_proj"):
        build_model(cfg, torch.float32, "cpu").load_weights(tensors.items())


def _undone_logits(model, changes: list[tuple[object, str, object]]) -> torch.Tensor:
    """The prompt's logits with each (object, attribute, value) set, then restored."""
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        return run(model, new_cache(model), PROMPT, positions, meta)
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


@pytest.mark.parametrize("variant", ["glm4_moe_lite", "youtu"])
def test_distinctive_features_bind(parity_models, variant):
    # each of them, undone, moves the variant's logits well past the tolerance
    model, ref = parity_models(variant)
    want = hf_logits(ref, PROMPT)
    attns = [layer.self_attn for layer in model.layers]
    mla = attns[0].mla
    assert (model.cfg.kv_planes, model.cfg.num_kv_heads, model.cfg.head_dim) == (1, 1, mla.cache_head_dim)
    assert all(a.q_b_proj is not None for a in attns)
    undone = {"rope pairs": [(a, "interleaved", not a.interleaved) for a in attns]}
    if variant == "glm4_moe_lite":  # mlp_layer_types: layer 0 sparse, layer 1 dense
        block = model.layers[0].mlp
        assert isinstance(block, SparseMoeBlock) and not isinstance(model.layers[1].mlp, SparseMoeBlock)
        moe = block.moe
        undone["routed_scaling_factor"] = [(block, "moe", dataclasses.replace(moe, routed_scaling_factor=1.0))]
        undone["expert groups"] = [(block, "moe", dataclasses.replace(moe, num_groups=1, topk_groups=1))]
    else:
        assert model.lm_head is None  # tied
    for name, changes in undone.items():
        assert (_undone_logits(model, changes) - want).abs().max() > 100 * ATOL, name


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["glm4_moe_lite", "youtu"])
def test_tp2_greedy_parity(tiny_checkpoints, parity_models, variant):
    # heads split by rank (q_b_proj and kv_b_proj by rows, o_proj by columns; the latent
    # projections whole), experts, dense MLPs and the vocabulary split, over two ranks,
    # chunked prefill and prefix-cache hits: transformers' greedy tokens
    _, ref = parity_models(variant)
    prompts = [list(range(20, 37)), [5, 9, 13]]
    want = hf_greedy(ref, prompts, 4)
    eng = LLMEngine(EngineConfig(model=str(tiny_checkpoints[variant]), num_blocks=32, block_size=4,
                                 max_num_batched_tokens=8, tensor_parallel_size=2))
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        assert [r.token_ids for r in eng.generate(prompts, params)] == want
        assert eng.generate(prompts[:1], params)[0].token_ids == want[0]
        attn = eng.runner.model.layers[1].self_attn
        # each rank its two heads' W_UK / W_UV, the one latent KV head whole
        assert attn.num_heads == 2 and eng.runner.kv_cache.shape[1:] == (1, 32, 4, 1, attn.mla.cache_head_dim)
    finally:
        eng.close()
