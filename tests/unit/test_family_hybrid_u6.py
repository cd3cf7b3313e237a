"""config.json parsing of Falcon-H1 and Zamba2: the defaults transformers' config
classes fill in (checked against them), the layout of layers that both attend and
keep a state, what is refused with a clear CheckpointError (tensor parallelism
too), Falcon-H1's and Zamba2's LoRA tensor names, Falcon-H1's gated-norm variant served through LLMEngine against
transformers. The full parity set runs in test_hybrid_parity (variants falcon_h1,
zamba2)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.dialects.zamba2 import HYBRID_KIND
from splitserve.engine.falcon_h1_config import PARALLEL_KIND
from splitserve.engine.mamba2_config import SSM_KIND
from splitserve.engine.hybrid_config import ATTENTION, HybridLayout, StateKind
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.unit.test_family_hybrid_u3 import in_proj_rows, lora_layout, lora_pair, lora_refused, raw
from tests.unit.test_family_olmo3_exaone import hf_config

ARCH = "FalconH1ForCausalLM"
ZAMBA2 = "Zamba2ForCausalLM"


def test_defaults_as_transformers_reads_them():
    c = {"architectures": [ARCH]}
    ours, ref = ModelConfig.from_hf(c), hf_config("FalconH1Config", c)
    assert ours.family == "falcon_h1"
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers)
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        ref.num_attention_heads, ref.num_key_value_heads, ref.hidden_size // ref.num_attention_heads)
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.tie_word_embeddings == ref.tie_word_embeddings
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert not ours.attention_bias and not ours.mlp_bias and ours.options.rotary_dim is None
    s = ours.options.mamba2
    assert (s.num_heads, s.head_dim, s.n_groups, s.state_size, s.conv_kernel) == (
        ref.mamba_n_heads, ref.mamba_d_head, ref.mamba_n_groups, ref.mamba_d_state, ref.mamba_d_conv)
    assert s.inner == ref.mamba_d_ssm == 1024
    assert s.conv_bias and not s.proj_bias and s.out_proj_bias is False and s.time_step_limit == ref.time_step_limit
    assert not s.gated_norm and s.norm_before_gate and s.in_proj_scales is None  # mamba_rms_norm false
    k = ours.options.falcon_h1
    assert (k.embedding, k.lm_head, k.key, k.attention_in, k.attention_out, k.ssm_in, k.ssm_out) == (
        ref.embedding_multiplier, ref.lm_head_multiplier, ref.key_multiplier, ref.attention_in_multiplier,
        ref.attention_out_multiplier, ref.ssm_in_multiplier, ref.ssm_out_multiplier)
    assert [k.mlp_gate, k.mlp_down] == ref.mlp_multipliers
    layout = ours.options.hybrid
    assert layout.layer_kinds == (PARALLEL_KIND,) * 32
    assert ours.num_cache_layers == 32 and len(layout.state_layers) == 32


def test_d_ssm_null_and_multipliers():
    c = {"architectures": [ARCH], "hidden_size": 64, "num_attention_heads": 4, "mamba_d_ssm": None,
         "mamba_n_heads": 8, "ssm_multipliers": [1.0, 2.0, 3.0, 4.0, 5.0], "mlp_multipliers": [0.5, 2.0]}
    ours, ref = ModelConfig.from_hf(c), hf_config("FalconH1Config", c)
    assert ours.options.mamba2.inner == ref.mamba_expand * 64 == 128
    assert ours.options.mamba2.head_dim == ref.mamba_d_head == 16
    assert ours.options.mamba2.in_proj_scales == (1, 2, 3, 4, 5)
    assert (ours.options.falcon_h1.mlp_gate, ours.options.falcon_h1.mlp_down) == (0.5, 2)


def test_layers_that_attend_and_keep_a_state():
    both = HybridLayout(("a", ATTENTION, "b", "a"), (StateKind("s", (2,)),), attending_kinds=("a",))
    assert both.attention_layers == (0, 1, 3) and both.state_layers == (0, 2, 3)
    assert both.num_cache_layers == 3 and both.cache_index(3) == 2 and both.state_index(3) == 2
    plain = HybridLayout(("a", ATTENTION, "b"), (StateKind("s", (2,)),))
    assert plain.attention_layers == (1,) and plain.state_layers == (0, 2) and plain.num_cache_layers == 1


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"layers_block_type": ["hybrid", "mamba"], "num_hidden_layers": 2}, "layers_block_type"),
    ({"ssm_multipliers": [1.0, 2.0]}, "ssm_multipliers"),
    ({"mlp_multipliers": [1.0]}, "mlp_multipliers"),
    ({"mamba_d_ssm": 1000}, "mamba_d_ssm"),
])
def test_refusals_name_the_option(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({"architectures": [ARCH], **extra})


def test_tensor_parallelism_is_refused():
    with pytest.raises(TensorParallelConfigError, match="falcon_h1"):
        check(ModelConfig.from_hf({"architectures": [ARCH]}), 2)


def test_falcon_h1_lora_on_attention_mlp_and_in_proj():
    model = ModelConfig.from_hf(raw(ARCH, num_hidden_layers=2))  # every layer attends and scans
    s, h, i, rows = model.options.mamba2, model.hidden_size, model.intermediate_size, in_proj_rows(model)
    ok = {**lora_pair("1.mamba.in_proj", h, rows), **lora_pair("1.self_attn.k_proj", h, 2 * model.head_dim),
          **lora_pair("0.feed_forward.gate_proj", h, i)}
    assert sorted(lora_layout(model, ok).modules) == [(0, "gate_proj"), (1, "in_proj"), (1, "k_proj")]
    lora_refused(model, (("0.mamba.out_proj", s.inner, h, "PEFT applies no LoRA to FalconH1ForCausalLM's"),
                         ("0.mlp.gate_proj", h, i, "no lora_A/lora_B weight")))


def test_gated_norm_variant_matches_transformers(tiny_checkpoints):
    # mamba_rms_norm with the gate after the norm, mamba_d_ssm null, tied embeddings: prompts
    # in chunks of 8 beside decoding sequences; greedy tokens and prompt logprobs
    path = tiny_checkpoints["falcon_h1_norm"]
    ref = hf_model(path)
    prompts = [[5, 9, 13], list(range(20, 41))]
    want = hf_greedy(ref, prompts, 5)
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=4, max_num_batched_tokens=8))
    outs = eng.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
    assert [o.token_ids for o in outs] == want
    with torch.no_grad():
        logits = ref(torch.tensor([prompts[1]])).logits[0].float().log_softmax(-1)
    expected = logits[torch.arange(len(prompts[1]) - 1), torch.tensor(prompts[1][1:])]
    got = torch.tensor([lp.logprob for lp in outs[1].prompt_logprobs[1:]])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    assert eng.kv.all_free()


def test_zamba2_defaults_as_transformers_reads_them():
    c = {"architectures": [ZAMBA2]}
    ours, ref = ModelConfig.from_hf(c), hf_config("Zamba2Config", c)
    assert ours.family == "zamba2"
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers)
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        ref.num_attention_heads, ref.num_key_value_heads, ref.attention_head_dim)
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.tie_word_embeddings == ref.tie_word_embeddings
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] and ours.options.hidden_act == ref.hidden_act
    s = ours.options.mamba2
    assert (s.num_heads, s.head_dim, s.n_groups, s.state_size, s.conv_kernel) == (
        ref.n_mamba_heads, ref.mamba_headdim, ref.mamba_ngroups, ref.mamba_d_state, ref.mamba_d_conv)
    assert s.time_step_limit == (ref.time_step_min, float("inf")) and s.norm_eps == 1e-5
    assert s.conv_bias and not s.proj_bias and not s.norm_before_gate
    b = ours.options.zamba2
    assert (b.num_blocks, b.adapter_rank, b.qkv_adapters, b.rope) == (
        ref.num_mem_blocks, ref.adapter_rank, ref.use_shared_attention_adapter, ref.use_mem_rope)
    kinds = ours.options.hybrid.layer_kinds
    assert [i for i, k in enumerate(kinds) if k == HYBRID_KIND] == ref.hybrid_layer_ids
    assert all(k in (SSM_KIND, HYBRID_KIND) for k in kinds)
    assert ours.num_cache_layers == len(ref.hybrid_layer_ids) and len(ours.options.hybrid.state_layers) == 54


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"use_long_context": True}, "use_long_context"),
    ({"layers_block_type": ["mamba", "mamba"], "num_hidden_layers": 2}, "no hybrid layer"),
    ({"layers_block_type": ["hybrid", "moe"], "num_hidden_layers": 2}, "moe"),
    ({"layers_block_type": ["hybrid"], "num_hidden_layers": 2}, "1 entries for 2 layers"),
    ({"use_shared_attention_adapter": True, "num_key_value_heads": 8}, "use_shared_attention_adapter"),
    ({"attention_hidden_size": 100}, "attention_hidden_size"),
    ({"n_mamba_heads": 7}, "n_mamba_heads"),
])
def test_zamba2_refusals_name_the_option(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({"architectures": [ZAMBA2], **extra})


def test_zamba2_tensor_parallelism_is_refused():
    with pytest.raises(TensorParallelConfigError, match="zamba2"):
        check(ModelConfig.from_hf({"architectures": [ZAMBA2]}), 2)


def test_zamba2_lora_per_layer_and_per_use_of_a_shared_block():
    model = ModelConfig.from_hf(raw(ZAMBA2, layers_block_type=["hybrid", "mamba"], num_key_value_heads=4))
    s, h, i, rows = model.options.mamba2, model.hidden_size, model.intermediate_size, in_proj_rows(model)
    q = model.num_heads * model.head_dim
    ok = {**lora_pair("0.mamba_decoder.mamba.in_proj", h, rows), **lora_pair("1.mamba.out_proj", s.inner, h),
          **lora_pair("0.linear", h, h), **lora_pair("0.shared_transformer.self_attn.k_proj", 2 * h, q),
          **lora_pair("0.shared_transformer.feed_forward.gate_up_proj", h, 2 * i)}
    assert sorted(lora_layout(model, ok).modules) == [(0, "gate_up_proj"), (0, "in_proj"), (0, "k_proj"),
                                                      (0, "linear"), (1, "out_proj")]
    lora_refused(model, (
        ("0.shared_transformer.self_attn.linear_q_adapter_list.0.0", 2 * h, 8, "own per-use adapters"),
        ("1.linear", h, h, "layer 1 is a Mamba-2 layer, without a shared block or linear"),
        ("0.mamba.in_proj", h, rows, "layer 0 is a hybrid layer, whose mixer is mamba_decoder.mamba"),
        ("2.mamba.in_proj", h, rows, "it is for layer 2; the model has 2 layers"),
        ("0.shared_transformer.feed_forward.up_proj", h, i, "no lora_A/lora_B weight")))


def test_zamba2_tied_copies_of_a_shared_block_are_skipped(tiny_checkpoints, tmp_path):
    # a checkpoint that also stores layer 3's copy of block 0 (its first home: layer 0)
    # loads as the one without it
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoints["zamba2"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    home = "model.layers.0.shared_transformer."
    tensors.update({"model.layers.3.shared_transformer." + k[len(home):]: v.clone()
                    for k, v in tensors.items() if k.startswith(home)})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [list(range(20, 33))]
    got = LLMEngine(EngineConfig(model=str(tmp_path), num_blocks=32, block_size=4)).generate(prompts, params)
    want = LLMEngine(EngineConfig(model=str(src), num_blocks=32, block_size=4)).generate(prompts, params)
    assert got[0].token_ids == want[0].token_ids
