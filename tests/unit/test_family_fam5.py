"""config.json parsing, routers and refusals of the InternLM3, Apertus,
PhiMoE and DBRX families: the defaults transformers' config classes fill
in (checked against those classes), xIELU and sparsemixer against
transformers' own functions, PhiMoE's LongRoPE past its switch, DBRX's
fused layouts, and a clear CheckpointError (or tensor-parallel refusal)
for what the engine does not support. Token parity is in
test_model_parity / test_engine_parity (internlm3, apertus) and
test_moe_parity (phimoe, dbrx); at tensor_parallel_size 2 in test_tp_engine
(slow); PhiMoE through the live hand-off in test_family_handoff."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.moe import route
from splitserve.engine.models.sparsemixer import route_sparsemixer
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, new_cache, run, step_meta


def raw(arch: str, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, **extra}


def hf_config(cls_name: str, cfg: dict):
    import transformers

    return getattr(transformers, cls_name)(**{k: v for k, v in cfg.items() if k != "architectures"})


def refused(cfg: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(cfg)


# --- InternLM3 ----------------------------------------------------------------

def test_internlm3_defaults_as_its_config_class():
    cfg = raw("InternLM3ForCausalLM")
    ours, ref = ModelConfig.from_hf(cfg), hf_config("InternLM3Config", cfg)
    assert ours.family == "internlm3" and ours.head_dim == ref.head_dim == 128
    assert ours.num_kv_heads == ref.num_key_value_heads == 2
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.max_position == ref.max_position_embeddings
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,)) and not ours.tie_word_embeddings
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (False, False, False)
    nulls = ModelConfig.from_hf(raw("InternLM3ForCausalLM", head_dim=None, num_key_value_heads=None))
    assert (nulls.head_dim, nulls.num_kv_heads) == (16, 4)


@pytest.mark.parametrize("keys", [{"qkv_bias": True, "bias": True},
                                  {"attention_bias": True, "mlp_bias": True}])
def test_internlm3_biases_by_either_name(keys):
    cfg = ModelConfig.from_hf(raw("InternLM3ForCausalLM", **keys))
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)


def test_internlm3_refuses_qkv_bias_apart_from_bias():
    refused(raw("InternLM3ForCausalLM", qkv_bias=True, bias=False), "qkv_bias .* different from bias")


# --- Apertus ------------------------------------------------------------------

def test_apertus_defaults_as_its_config_class():
    cfg = raw("ApertusForCausalLM")
    ours, ref = ModelConfig.from_hf(cfg), hf_config("ApertusConfig", cfg)
    assert ours.family == "apertus" and ours.qk_norm and ours.num_kv_heads == ref.num_key_value_heads == 4
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.max_position == ref.max_position_embeddings
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] == 12_000_000.0
    for key in ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        assert ours.rope_scaling[key] == ref.rope_parameters[key], key
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (False, False, False)
    assert ours.options.hidden_act == "xielu" and ours.options.plain_mlp == ("up_proj", "down_proj")
    check(ours, 2)  # Llama-like with RMSNorm: splits across ranks


def test_apertus_xielu_matches_transformers():
    from transformers.activations import XIELUActivation

    from splitserve.engine.models.apertus import XieluMLP

    cfg = ModelConfig.from_hf(raw("ApertusForCausalLM"))
    ref = XIELUActivation(dtype=torch.float32)
    mlp = XieluMLP(cfg, torch.float32, "cpu", "mlp")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("alpha_p", "alpha_n", "beta", "eps"):
            getattr(ref, name).add_(0.3 * torch.randn(getattr(ref, name).shape, generator=gen))
            getattr(mlp, name).copy_(getattr(ref, name).reshape(1))
    x = 3 * torch.randn(64, 32, generator=gen)
    x[0, :4] = torch.tensor([0.0, -1e-7, 1e-7, -0.0])  # around the eps kink
    torch.testing.assert_close(mlp.xielu(x), ref._xielu_python(x), atol=0, rtol=0)


def test_apertus_refusals(tiny_checkpoints):
    refused(raw("ApertusForCausalLM", hidden_act="silu"), "hidden_act 'silu' is not supported for apertus")
    refused(raw("ApertusForCausalLM", quantization_config={"quant_method": "fp8"}),
            "fp8 ApertusForCausalLM checkpoints are not supported")
    # LoRA takes the xIELU MLP's up_proj / down_proj (PEFT parity: test_lora_engine)
    model = load_model(load_checkpoint(tiny_checkpoints["apertus"]), torch.float32)
    assert {name for _, name in model.enable_lora(1, 8)} >= {"q_proj", "up_proj", "down_proj"}


# --- PhiMoE -------------------------------------------------------------------

def test_phimoe_defaults_as_its_config_class():
    cfg = raw("PhimoeForCausalLM", num_local_experts=4)
    ours, ref = ModelConfig.from_hf(cfg), hf_config("PhimoeConfig", cfg)
    assert ours.family == "phimoe" and ours.num_kv_heads == ref.num_key_value_heads == 8
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.max_position == ref.max_position_embeddings
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] and ours.rope_scaling is None
    assert ours.sliding_window is None and ours.layer_windows == (0, 0)
    moe = ours.moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size) == (4, 2, 128)
    assert moe.sparsemixer_eps == ref.router_jitter_noise and not moe.renormalize
    assert ours.options.layer_norm and not ours.options.lm_head_bias
    windowed = ModelConfig.from_hf(raw("PhimoeForCausalLM", sliding_window=8, lm_head_bias=True))
    assert windowed.layer_windows == (8, 8) and windowed.options.lm_head_bias
    check(ours, 2)  # its LayerNorms whole on every rank, experts split as Mixtral's
    with pytest.raises(TensorParallelConfigError, match="PhimoeForCausalLM cannot run at tensor_parallel_size 3"):
        check(ours, 3)


def test_phimoe_refusals():
    refused(raw("PhimoeForCausalLM", num_experts_per_tok=1), "sparsemixer router always picks 2")
    refused(raw("PhimoeForCausalLM", rope_scaling={"rope_type": "linear", "factor": 2.0}),
            "rope scaling 'linear' is not supported for phimoe")
    refused(raw("PhimoeForCausalLM", rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                   "long_factor": [1.0] * 8, "long_mscale": 1.0}),
            "needs short_mscale")
    refused(raw("PhimoeForCausalLM", partial_rotary_factor=0.5), "partial_rotary_factor 0.5")


@pytest.mark.parametrize("eps", [0.01, 0.2, 1.0])
def test_sparsemixer_matches_transformers(eps):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    logits = torch.randn(200, 6, generator=torch.Generator().manual_seed(3))
    logits[0] = torch.tensor([1.0, 0.99, -2.0, 0.5, 0.98, -0.1])  # several near the best
    want_w, want_ids = sparsemixer(logits, jitter_eps=eps, training=False)
    weights, ids = route_sparsemixer(logits, eps)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, atol=0, rtol=0)


@torch.no_grad()
def test_phimoe_decodes_past_the_longrope_switch(parity_models):
    # a 60-token prompt and 8 decode steps: positions from 64 (original_max_position_embeddings)
    # on take long_mscale, against transformers' forward with its cache, step by step (its
    # generate instead re-prefills the whole sequence once at the switch, which a paged cache
    # of rotated keys cannot do; the parity variants stay below it)
    model, ref = parity_models("phimoe")
    ids = [(7 * i + 3) % 500 for i in range(60)]
    kv = new_cache(model)
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(ids)])
    ours = run(model, kv, ids, positions, meta)[-1]
    out = ref(torch.tensor([ids]), use_cache=True)
    for _ in range(8):
        torch.testing.assert_close(ours, out.logits[0, -1], atol=ATOL, rtol=0)
        ids.append(int(ours.argmax()))
        positions, meta = step_meta([IDENTITY_TABLE], [len(ids) - 1], [1])
        ours = run(model, kv, ids[-1:], positions, meta)[-1]
        out = ref(torch.tensor([ids[-1:]]), cache=out.past_key_values, use_cache=True,
                  position_ids=torch.tensor([[len(ids) - 1]]))
    assert len(ids) - 1 > 64


# --- DBRX ---------------------------------------------------------------------

def dbrx(**extra) -> dict:
    return {"architectures": ["DbrxForCausalLM"], "vocab_size": 32, "d_model": 64, "n_heads": 4,
            "n_layers": 2, **extra}


def test_dbrx_defaults_as_its_config_class():
    cfg = dbrx()
    ours, ref = ModelConfig.from_hf(cfg), hf_config("DbrxConfig", cfg)
    assert ours.family == "dbrx" and ours.head_dim == 16 and ours.num_kv_heads == ref.attn_config.kv_n_heads
    assert ours.max_position == ref.max_position_embeddings and ours.rms_norm_eps == 1e-5
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] == 10000.0
    moe, ffn = ours.moe, ref.ffn_config
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size) == (
        ffn.moe_num_experts, ffn.moe_top_k, ffn.ffn_hidden_size)
    assert moe.expert_weight_norm == ffn.moe_normalize_expert_weights and not moe.renormalize
    assert ours.options.clip_qkv is None and ours.options.float_layer_norm == "weight"
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (False, False, False)
    check(ours, 2)  # Wqkv and the experts split at load, then sharded (TP=2 parity: test_tp_engine)
    with pytest.raises(TensorParallelConfigError, match="DbrxForCausalLM cannot run at tensor_parallel_size 3"):
        check(ours, 3)


def test_dbrx_rope_theta():
    # transformers 5 writes rope_parameters; older configs hold it in attn_config
    assert ModelConfig.from_hf(dbrx(rope_parameters={"rope_type": "default", "rope_theta": 7.0},
                                    attn_config={"rope_theta": 5.0})).rope_theta == 7.0
    assert ModelConfig.from_hf(dbrx(attn_config={"rope_theta": 500000})).rope_theta == 500000.0


def test_dbrx_routes_by_the_p_norm():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    weights, ids = route(logits, 2, False, 3.0)
    top = torch.softmax(logits, -1).topk(2).values
    torch.testing.assert_close(weights, top / top.pow(3).sum(-1, keepdim=True) ** (1 / 3))


def test_dbrx_refusals(tiny_checkpoints):
    refused(dbrx(tie_word_embeddings=True), "tie_word_embeddings is not supported for DBRX")
    refused(dbrx(ffn_config={"ffn_act_fn": {"name": "gelu"}}), "ffn_act_fn .* not supported for dbrx")
    refused(dbrx(attn_config={"clip_qkv": 0}), "clip_qkv must be positive")
    refused(dbrx(d_model=66), r"d_model \(66\) must be a multiple of n_heads")
    refused(dbrx(quantization_config={"quant_method": "fp8"}), "fp8 DBRX checkpoints are not supported")
    model = load_model(load_checkpoint(tiny_checkpoints["dbrx"]), torch.float32)
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for DBRX"):
        model.enable_lora(1, 8)


def test_dbrx_misshapen_experts_are_named(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoints["dbrx"]
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f.resolve())
    (tmp_path / "model.safetensors").unlink()
    tensors = load_file(str(src / "model.safetensors"))
    name = "transformer.blocks.1.ffn.experts.mlp.v1"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor '{name}': expected shape \\[128, 64\\]"):
        load_model(load_checkpoint(tmp_path), torch.float32)
