"""config.json parsing and loading of OLMoE, GraniteMoE and GraniteMoeShared:
the defaults transformers' config classes fill in, the options read, the
fused GraniteMoE experts split at load, and a clear CheckpointError (or
tensor parallel refusal) for what the engine does not support. Token parity
is in test_moe_parity."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.lora.adapter import AdapterError, parse_adapter_config
from splitserve.engine.lora.layout import adapter_layout
from splitserve.engine.models.granitemoe import GraniteMoeCausalLM
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **extra}


def test_olmoe_defaults():
    m = ModelConfig.from_hf(raw("OlmoeForCausalLM"))
    assert m.family == "olmoe" and m.rms_norm_eps == 1e-5
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (64, 8, 128)
    assert not m.moe.renormalize and m.moe.sparse_layers == (True, True)
    assert m.qk_norm and m.options.full_qk_norm and not m.options.norm_fp32_product
    assert m.options.clip_qkv is None and not (m.attention_bias or m.o_proj_bias or m.mlp_bias)
    # windows and Qwen's dense-layer keys are no OLMoE options
    m = ModelConfig.from_hf(raw("OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True, clip_qkv=8, attention_bias=True,
                                sliding_window=4, use_sliding_window=True, mlp_only_layers=[0]))
    assert m.moe.renormalize and m.options.clip_qkv == 8.0 and m.attention_bias and m.o_proj_bias
    assert m.layer_windows == (0, 0) and m.moe.sparse_layers == (True, True)


def test_granitemoe_defaults_and_multipliers():
    m = ModelConfig.from_hf(raw("GraniteMoeForCausalLM"))
    assert m.family == "granitemoe" and m.rms_norm_eps == 1e-6
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (8, 2, 128)
    assert m.moe.renormalize and m.options.attn_scale == 1.0 and m.options.embed_scale == 1.0
    m = ModelConfig.from_hf(raw("GraniteMoeForCausalLM", num_local_experts=4, embedding_multiplier=12,
                                attention_multiplier=0.015625, residual_multiplier=0.22,
                                logits_scaling=6, attention_bias=True, qk_norm=True,
                                attention_out_bias=False))  # keys GraniteMoE never reads
    o = m.options
    assert (o.embed_scale, o.attn_scale, o.residual_scale, o.logits_divisor) == (12, 0.015625, 0.22, 6)
    assert m.moe.num_experts == 4 and m.attention_bias and m.o_proj_bias and not m.mlp_bias
    assert not m.qk_norm


def test_granitemoeshared_reads_the_shared_mlp_size():
    m = ModelConfig.from_hf(raw("GraniteMoeSharedForCausalLM", shared_intermediate_size=48))
    assert m.family == "granitemoeshared" and m.intermediate_size == 48
    assert m.moe.expert_intermediate_size == 128
    assert ModelConfig.from_hf(raw("GraniteMoeSharedForCausalLM")).intermediate_size == 0  # none


@pytest.mark.parametrize("arch, extra, match", [
    ("OlmoeForCausalLM", {"head_dim": 32}, "q_norm spans hidden_size"),
    ("OlmoeForCausalLM", {"clip_qkv": 0}, "clip_qkv must be positive"),
    ("OlmoeForCausalLM", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for olmoe"),
    ("GraniteMoeForCausalLM", {"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ("GraniteMoeForCausalLM", {"logits_scaling": 0}, "logits_scaling must be a positive"),
    ("GraniteMoeForCausalLM", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("GraniteMoeSharedForCausalLM", {"quantization_config": {"quant_method": "fp8"}},
     "fp8 GraniteMoE checkpoints"),
])
def test_unsupported_options_are_refused(arch, extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(arch, **extra))


def test_tensor_parallel():
    check(ModelConfig.from_hf(raw("OlmoeForCausalLM")), 2)  # all-head q/k norms: test_tp_engine
    check(ModelConfig.from_hf(raw("GraniteMoeForCausalLM")), 2)
    check(ModelConfig.from_hf(raw("GraniteMoeSharedForCausalLM", shared_intermediate_size=48)), 2)
    with pytest.raises(TensorParallelConfigError, match="intermediate_size \\(49\\)"):
        check(ModelConfig.from_hf(raw("GraniteMoeSharedForCausalLM", shared_intermediate_size=49)), 2)


def test_lora_on_attention_only():
    cfg = parse_adapter_config({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    model = ModelConfig.from_hf(raw("GraniteMoeSharedForCausalLM", shared_intermediate_size=48))
    stem = "base_model.model.model.layers.0"
    q = {f"{stem}.self_attn.q_proj.lora_A.weight": (4, 64), f"{stem}.self_attn.q_proj.lora_B.weight": (64, 4)}
    assert list(adapter_layout(cfg, q, model, 8).modules) == [(0, "q_proj")]
    for name, match in ((f"{stem}.mlp.gate_proj", "mixture-of-experts"),
                        (f"{stem}.block_sparse_moe.input_linear", "MoE experts"),
                        (f"{stem}.shared_mlp.input_linear", "no lora_A/lora_B weight")):
        with pytest.raises(AdapterError, match=match):
            adapter_layout(cfg, {f"{name}.lora_A.weight": (4, 64), f"{name}.lora_B.weight": (48, 4)},
                           model, 8)


def test_clip_qkv_binds(parity_models):
    # without the clamp the logits move well past the tolerance
    model, ref = parity_models("olmoe")
    attns = [layer.self_attn for layer in model.layers]
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    try:
        for a in attns:
            a.clip_qkv = None
        unclipped = run(model, new_cache(model), PROMPT, positions, meta)
    finally:
        for a in attns:
            a.clip_qkv = 1.5
    assert (unclipped - hf_logits(ref, PROMPT)).abs().max() > 100 * ATOL


def test_granitemoe_layers_and_split(parity_models, tiny_checkpoints):
    model, _ = parity_models("granitemoeshared")
    layer = model.layers[0]
    assert isinstance(layer.mlp, SparseMoeBlock) and layer.shared_mlp.intermediate == 48
    plain, _ = parity_models("granitemoe")
    assert plain.layers[0].shared_mlp is None
    # a fused tensor of the wrong shape is refused by its own name
    from safetensors.torch import load_file

    ck = load_checkpoint(tiny_checkpoints["granitemoe"])
    tensors = load_file(str(ck.weight_files[0]))
    bad = "model.layers.1.block_sparse_moe.input_linear.weight"
    tensors[bad] = tensors[bad][:3]
    fresh = GraniteMoeCausalLM(ck.model_config, torch.float32, "cpu")
    with pytest.raises(CheckpointError, match=bad.replace(".", r"\.") + ".*expected shape \\[4, 256, 64\\]"):
        fresh.load_weights(tensors.items())
    # a shared MLP in a checkpoint whose config.json has none is named as stored
    tensors = load_file(str(ck.weight_files[0]))
    tensors["model.layers.0.shared_mlp.input_linear.weight"] = torch.zeros(96, 64)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.shared_mlp.input_linear"):
        GraniteMoeCausalLM(ck.model_config, torch.float32, "cpu").load_weights(tensors.items())


@pytest.mark.slow
def test_granitemoeshared_tp2_greedy_parity(tiny_checkpoints, parity_models):
    # experts, shared MLP and Granite's scalars split over two ranks (one spawned over
    # gloo), chunked prefill and prefix-cache hits: transformers' greedy tokens
    _, ref = parity_models("granitemoeshared")
    prompts = [list(range(20, 37)), [5, 9, 13]]
    want = hf_greedy(ref, prompts, 4)
    eng = LLMEngine(EngineConfig(model=str(tiny_checkpoints["granitemoeshared"]), num_blocks=32,
                                 block_size=4, max_num_batched_tokens=8, tensor_parallel_size=2))
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        assert [r.token_ids for r in eng.generate(prompts, params)] == want
        assert eng.generate(prompts[:1], params)[0].token_ids == want[0]
        layer = eng.runner.model.layers[0]
        assert layer.mlp.w_down.shape[2] == 64 and layer.shared_mlp.intermediate == 24
    finally:
        eng.close()
