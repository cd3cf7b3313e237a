"""DeepSeek-V2 and DeepSeek-V3 (multi-head latent attention): V2's softmax
router against transformers' own, the RoPE table and softmax scale against
transformers' for YaRN with mscale, config.json defaults and the options
read, what is refused (LoRA among it), tensor parallelism at TP=2 (slow),
the multi-token-prediction layers skipped at load, that each variant's
distinctive features move the logits, ``weight_dtype: fp8`` on the latent
projections and a block-fp8 checkpoint (DeepSeek's own format) against its
dequantized weights, and the latent cache: its size per token and a
hand-off between two engines. Token parity is in test_moe_parity."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.config import EngineConfig, ModelConfig, MoEConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.deepseek import DeepseekCausalLM
from splitserve.engine.models.grouped_router import route_softmax_groups
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.engine.models.rope import build_cos_sin_cache
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.fixtures.fp8_checkpoints import write_dequantized_checkpoint, write_fp8_checkpoint
from tests.fixtures.handoff import export_layers, export_meta, handoff_generate
from tests.unit.test_model_parity import (ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, prompt_logits,
                                          run, step_meta)

V2, V3 = "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"
# ||fp8 logits - float32 logits|| / ||float32 logits|| with weights quantized per channel:
# measured 0.26 on deepseek_v3 (its q_a -> q_b and kv_a -> kv_b chains; GLM-4.5's tiny
# variant measures 0.24), 0.09 on deepseek_v2; a misplaced scale gives ~1
LOGIT_REL_BOUND = 0.35


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 16, "num_experts_per_tok": 2, **extra}


def _sorted(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


@pytest.mark.parametrize("method, groups, kept, top_k, scale", [
    ("greedy", None, None, 3, 1.0), ("group_limited_greedy", 4, 2, 3, 1.5),
    ("group_limited_greedy", 16, 3, 2, 0.7)])
def test_v2_router_matches_transformers(method, groups, kept, top_k, scale):
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    hf_cfg = transformers.DeepseekV2Config(hidden_size=32, num_attention_heads=4, n_routed_experts=16,
                                           n_group=groups, topk_group=kept, topk_method=method,
                                           num_experts_per_tok=top_k, routed_scaling_factor=scale)
    router = DeepseekV2TopkRouter(hf_cfg)
    gen = torch.Generator().manual_seed(140)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=gen))
    x = torch.randn(64, 32, generator=gen)
    _, want_w, want_ids = router(x)
    moe = MoEConfig(num_experts=16, top_k=top_k, expert_intermediate_size=8, renormalize=False,
                    sparse_layers=(True,), scaled_softmax=True, group_limited=groups is not None,
                    num_groups=groups or 1, topk_groups=kept or 1, routed_scaling_factor=scale)
    w, ids = _sorted(*route_softmax_groups(F.linear(x, router.weight), moe))
    want_w, want_ids = _sorted(want_w, want_ids)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch, rope", [
    (V3, {"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0, "mscale": 1.0, "mscale_all_dim": 0.8,
          "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 64}),
    (V2, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0, "mscale": 0.707, "mscale_all_dim": 0.707,
          "original_max_position_embeddings": 32}),
    (V3, {"rope_type": "default", "rope_theta": 10000.0}),
])
def test_rope_table_and_softmax_scale_match_transformers(arch, rope):
    import transformers
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

    shape = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None,
                 qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=256,
                 n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    config_cls, attention, rotary = ((transformers.DeepseekV2Config, v2.DeepseekV2Attention,
                                      v2.DeepseekV2RotaryEmbedding) if arch == V2 else
                                     (transformers.DeepseekV3Config, v3.DeepseekV3Attention,
                                      v3.DeepseekV3RotaryEmbedding))
    hf_cfg = config_cls(**shape, rope_parameters=dict(rope))
    out = rotary(hf_cfg)(torch.zeros(1), torch.arange(256)[None])
    # V2: a complex table [1, P, rope / 2]; V3: cos and sin [1, P, rope], the halves alike
    cos, sin = (out[0].real, out[0].imag) if arch == V2 else (out[0][0, :, :4], out[1][0, :, :4])
    cfg = ModelConfig.from_hf({**raw(arch, **shape), "rope_parameters": dict(rope)})
    assert cfg.options.attn_scale == attention(hf_cfg, 0).scaling
    table = build_cos_sin_cache(cfg)
    assert table.shape == (256, 8)
    torch.testing.assert_close(table[:, :4], cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(table[:, 4:], sin, atol=1e-6, rtol=0)


def test_v2_defaults_and_options():
    m = ModelConfig.from_hf(raw(V2))
    mla = m.options.mla
    assert m.family == "deepseek_v2" and m.num_kv_heads == 1 and m.head_dim == 576  # the latent: 512 + 64
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) \
        == (1536, 512, 128, 64, 128)
    assert m.options.rotary_dim == 64 and m.options.interleaved_rope and m.options.mtp_layers == 0
    assert m.options.attn_scale == 192 ** -0.5 and m.max_position == 2048 and m.rms_norm_eps == 1e-6
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (64, 2, 1407)
    assert m.moe.scaled_softmax and not (m.moe.group_limited or m.moe.renormalize or m.moe.grouped_sigmoid)
    assert m.moe.sparse_layers == (True,) * 4 and m.moe.shared_expert_intermediate_size == 2 * 1407
    assert not (m.attention_bias or m.o_proj_bias or m.mlp_bias or m.qk_norm or m.tie_word_embeddings)
    m = ModelConfig.from_hf(raw(V2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                                qk_rope_head_dim=8, v_head_dim=32, topk_method="group_limited_greedy",
                                n_routed_experts=8, n_group=4, topk_group=2, first_k_dense_replace=2,
                                n_shared_experts=0, routed_scaling_factor=16.0, attention_bias=True,
                                mlp_bias=True, num_key_value_heads=16, head_dim=5,
                                max_position_embeddings=64))
    assert m.options.mla.q_lora_rank == 0 and m.head_dim == 40 and m.options.rotary_dim == 8
    assert m.moe.group_limited and (m.moe.num_groups, m.moe.topk_groups) == (4, 2)
    assert m.moe.routed_scaling_factor == 16.0
    assert m.moe.sparse_layers == (False, False, True, True) and m.moe.shared_expert_intermediate_size == 0
    assert m.attention_bias and m.o_proj_bias and m.mlp_bias and m.max_position == 64


def test_v3_defaults_and_options():
    cfg = raw(V3)
    del cfg["num_experts_per_tok"]
    m = ModelConfig.from_hf(cfg)
    assert m.family == "deepseek_v3" and m.head_dim == 576 and m.options.mla.q_lora_rank == 1536
    assert m.options.interleaved_rope and m.options.mtp_layers == 1 and m.max_position == 4096
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (256, 8, 2048)
    assert m.moe.grouped_sigmoid and m.moe.renormalize and not m.moe.scaled_softmax
    assert (m.moe.num_groups, m.moe.topk_groups, m.moe.routed_scaling_factor) == (8, 4, 2.5)
    assert m.moe.sparse_layers == (False, False, False, True)
    assert m.moe.shared_expert_intermediate_size == 2048
    m = ModelConfig.from_hf(raw(V3, rope_interleave=False, num_nextn_predict_layers=0, n_routed_experts=8,
                                n_group=2, topk_group=1, norm_topk_prob=False, first_k_dense_replace=0,
                                mlp_bias=True, attention_bias=True, v_head_dim=256,
                                rope_scaling={"type": "yarn", "factor": 40, "mscale": 1.0,
                                              "mscale_all_dim": 1.0,
                                              "original_max_position_embeddings": 4096}))
    assert not m.options.interleaved_rope and m.options.mtp_layers == 0 and m.head_dim == 576
    assert not m.moe.renormalize and m.moe.sparse_layers == (True,) * 4
    assert m.attention_bias and m.o_proj_bias and not m.mlp_bias
    assert m.rope_scaling["original_max_position_embeddings"] == 4096
    assert m.options.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * 1.0 * 3.6888794541139363 + 1) ** 2)


@pytest.mark.parametrize("arch, extra, match", [
    (V2, {"num_key_value_heads": 4}, r"num_key_value_heads \(4\) must equal num_attention_heads \(16\)"),
    (V2, {"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported"),
    (V3, {"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported"),
    (V2, {"topk_method": "noaux_tc"}, "topk_method 'noaux_tc' is not supported for DeepseekV2ForCausalLM"),
    (V2, {"norm_topk_prob": True}, "norm_topk_prob is not supported"),
    (V2, {"topk_method": "group_limited_greedy", "n_routed_experts": 8, "n_group": 3, "topk_group": 1},
     r"n_group \(3\) must split"),
    (V2, {"topk_method": "group_limited_greedy", "n_routed_experts": 8, "n_group": 4, "topk_group": 1,
          "num_experts_per_tok": 3}, r"num_experts_per_tok \(3\) at most"),
    (V2, {"topk_method": "group_limited_greedy"}, "missing required key 'n_group'"),
    (V2, {"num_experts_per_tok": None}, "missing required key 'num_experts_per_tok'"),
    (V2, {"routed_scaling_factor": 0}, "routed_scaling_factor must be positive"),
    (V3, {"n_routed_experts": 8, "n_group": 8}, "groups of at least 2"),
    (V2, {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for deepseek_v2"),
    (V3, {"qk_rope_head_dim": 7}, "qk_rope_head_dim must be even"),
    (V3, {"kv_lora_rank": 0}, "kv_lora_rank must be a positive integer"),
    (V3, {"rope_parameters": {"rope_type": "yarn", "mscale_all_dim": 1.0}}, "mscale_all_dim without factor"),
    (V3, {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_options_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


def test_v32_stays_unsupported():
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        ModelConfig.from_hf(raw("DeepseekV32ForCausalLM"))


@pytest.mark.parametrize("arch", [V2, V3])
def test_lora_refused_and_tensor_parallel_splits(arch):
    cfg = ModelConfig.from_hf(raw(arch, n_routed_experts=8, n_group=2, topk_group=1, q_lora_rank=16,
                                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                  moe_intermediate_size=32))
    with pytest.raises(CheckpointError, match=f"LoRA adapters are not supported for {arch}"):
        DeepseekCausalLM(cfg, torch.float32, "cpu").enable_lora(1, 4)
    check(cfg, 2)
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(16\) is not a multiple"):
        check(cfg, 3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v3"])
def test_tp2_greedy_parity(tiny_checkpoints, parity_models, variant):
    # heads split by rank (q_proj / q_b_proj and kv_b_proj by rows, o_proj by columns; the
    # latent projections whole), experts and dense layers split, over two ranks (one spawned
    # over gloo), chunked prefill and prefix-cache hits: transformers' greedy tokens
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


def test_mtp_layers_are_skipped_at_load(tiny_checkpoints):
    from safetensors.torch import load_file

    ck = load_checkpoint(tiny_checkpoints["deepseek_v3"])
    cfg = ck.model_config
    assert cfg.options.mtp_layers == 1  # transformers' default, written by its config class
    tensors = load_file(str(ck.weight_files[0]))
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    DeepseekCausalLM(cfg, torch.float32, "cpu").load_weights(tensors.items())
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # past the MTP layers
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.3.eh_proj"):
        DeepseekCausalLM(cfg, torch.float32, "cpu").load_weights(tensors.items())


@contextlib.contextmanager
def _swapped(changes: list[tuple[object, str, object]]):
    """Each (object, attribute, value) set for the block, then restored."""
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v3"])
def test_distinctive_features_bind(parity_models, variant):
    # each of them, undone, moves the variant's logits well past the tolerance
    model, ref = parity_models(variant)
    want = hf_logits(ref, PROMPT)
    attns = [layer.self_attn for layer in model.layers]
    block = model.layers[1].mlp
    assert isinstance(block, SparseMoeBlock) and not isinstance(model.layers[0].mlp, SparseMoeBlock)
    mla = attns[0].mla
    # the cache: one plane, one KV head of the latent and k_pe
    assert (model.cfg.kv_planes, model.cfg.num_kv_heads, model.cfg.head_dim) == (1, 1, mla.cache_head_dim)
    moe = block.moe
    undone = {"interleaved rope": [(a, "interleaved", False) for a in attns],
              "routed_scaling_factor": [(block, "moe", dataclasses.replace(moe, routed_scaling_factor=1.0))],
              "expert groups": [(block, "moe", dataclasses.replace(moe, group_limited=False, num_groups=1,
                                                                    topk_groups=1))]}
    if variant == "deepseek_v3":  # YaRN's mscale_all_dim in the softmax scale
        undone["mscale_all_dim"] = [(a, "scale", mla.qk_head_dim ** -0.5) for a in attns]
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    for name, changes in undone.items():
        with _swapped(changes):
            wrong = run(model, new_cache(model), PROMPT, positions, meta)
        assert (wrong - want).abs().max() > 100 * ATOL, name


def test_weight_dtype_fp8_quantizes_at_load(tiny_checkpoints, parity_models):
    # every latent projection but kv_b_proj (read as the absorbed W_UK / W_UV) and the experts
    # to fp8 once loaded; the router stays float32
    model = load_model(load_checkpoint(tiny_checkpoints["deepseek_v3"]), torch.float32, weight_dtype="fp8")
    attn, block = model.layers[1].self_attn, model.layers[1].mlp
    for linear in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.o_proj):
        assert linear.weight.dtype == torch.float8_e4m3fn
    assert attn.kv_b_proj.weight.dtype == torch.float32
    assert block.w_down.dtype == torch.float8_e4m3fn and block.gate.weight.dtype == torch.float32
    full, _ = parity_models("deepseek_v3")
    logits, ref = prompt_logits(model), prompt_logits(full)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < LOGIT_REL_BOUND


def test_block_fp8_checkpoint_matches_its_dequantized_weights(tiny_checkpoints, tmp_path):
    # DeepSeek's own format (quant_method fp8, weight_scale_inv per block; 16x16 here, so that
    # blocks split every projection, some partially): every latent projection, dense MLP and
    # expert in fp8, routers and the correction bias float32; greedy tokens through the
    # engine (chunked prefill) and prefill logits are transformers' on the dequantized weights
    q = write_fp8_checkpoint(tiny_checkpoints["deepseek_v3"], tmp_path / "fp8", "fp8_block", block=16)
    ref = hf_model(write_dequantized_checkpoint(q, tmp_path / "dequantized"))
    prompts = [[5, 9, 13], list(range(20, 37))]
    eng = LLMEngine(EngineConfig(model=str(q), num_blocks=32, block_size=4, max_num_batched_tokens=8))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, params)] == hf_greedy(ref, prompts, 4)
    model = eng.runner.model
    attn, block = model.layers[1].self_attn, model.layers[1].mlp
    for linear in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.o_proj,
                   model.layers[0].mlp.gate_up_proj, block.shared_expert.down_proj):
        assert linear.weight.dtype == torch.float8_e4m3fn and linear.fp8_groups == (16, 16)
    # kv_b_proj dequantized once at load, to the model dtype (the absorbed form's W_UK / W_UV)
    ref_kv_b = ref.model.layers[1].self_attn.kv_b_proj.weight
    assert attn.kv_b_proj.weight.dtype == torch.float32 and attn.kv_b_proj.weight_scale is None
    torch.testing.assert_close(attn.kv_b_proj.weight, ref_kv_b.to(torch.float32))
    assert block.w_gate_up.dtype == torch.float8_e4m3fn and block.gate.weight.dtype == torch.float32
    assert block.e_score_correction_bias.dtype == torch.float32
    torch.testing.assert_close(prompt_logits(model), hf_logits(ref, PROMPT), atol=ATOL, rtol=0)


def test_latent_cache_size_and_handoff(tiny_checkpoints, parity_models):
    # the cache holds kv_lora_rank + qk_rope_head_dim values per token and layer, once (one
    # plane: the key is the value), so a fixed kv_cache_memory_gb holds that many more blocks
    # than the decompressed layout (2 planes of every head at the wider of the key and value
    # widths); a sequence prefilled on one engine resumes on another from its exported
    # blocks (the second prompt's prefix cached there), with transformers' tokens
    path = tiny_checkpoints["deepseek_v3"]
    _, ref = parity_models("deepseek_v3")
    mc = load_checkpoint(path).model_config
    mla, layers = mc.options.mla, mc.num_cache_layers
    latent = mla.kv_lora_rank + mla.qk_rope_head_dim
    assert mc.kv_bytes_per_token(torch.float32) == layers * latent * 4
    decompressed = 2 * layers * mc.num_heads * max(mla.qk_head_dim, mla.v_head_dim) * 4
    assert decompressed == 32 * mc.kv_bytes_per_token(torch.float32) // 5  # 2 * 4 heads * 32 vs 40
    budget_gb, bs = 0.002, 4
    src, dst = (LLMEngine(EngineConfig(model=str(path), kv_cache_memory_gb=budget_gb, block_size=bs,
                                       max_num_batched_tokens=8)) for _ in range(2))
    blocks = int(budget_gb * (1 << 30)) // (bs * layers * latent * 4)
    assert src.runner.kv_cache.shape == (layers, 1, blocks, bs, 1, latent)
    assert src.kv.num_blocks == blocks > int(budget_gb * (1 << 30)) // (bs * decompressed) * 6
    assert src.kv_port.spec().bytes_per_block == src.runner.kv_cache[:, :, 0].numel() * 4
    prompts = [list(range(20, 37)), list(range(20, 37)) + [5, 9]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    src.add_request("x", prompt_token_ids=prompts[0], params=params, prefill_only=True)
    while src.has_unfinished():
        src.step()
    buf = export_layers(src, "x", 0, layers)
    assert export_meta(src, "x").layout.num_kv_heads == 1
    assert buf.shape == (layers, 1, 5, bs, 1, latent) and buf.abs().sum() > 0
    src.kv_port.release("x")
    assert handoff_generate(src, dst, prompts, params) == hf_greedy(ref, prompts, 4)
    assert src.kv.all_free() and dst.kv.all_free()
