"""MiMo-V2-Flash (mimo_v2_flash): config.json defaults against transformers'
config class, the hub's key names (``sliding_window_size``, null scales), what
is refused (LoRA and tensor parallelism among it), the multi-token-prediction
weights skipped and the hub's sink name read at load, and that the variant's
distinctive features move the logits. Token parity is in test_moe_parity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.models import build_model
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from tests.unit.test_model_parity import ATOL, IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta

ARCH = "MiMoV2FlashForCausalLM"


def raw(**extra) -> dict:
    return {"architectures": [ARCH], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 7, "num_attention_heads": 8, "n_routed_experts": 8, **extra}


def test_defaults_as_its_config_class():
    import transformers

    cfg = raw()
    ours = ModelConfig.from_hf(cfg)
    ref = transformers.MiMoV2FlashConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    shape = ours.options.mimo_v2
    assert ours.family == "mimo_v2_flash"
    assert (ours.head_dim, shape.v_head_dim, shape.value_scale) == (ref.head_dim, ref.v_head_dim,
                                                                   ref.attention_value_scale) == (192, 128, 0.707)
    assert shape.kv_heads == ref.num_key_value_heads == 4 and ours.num_kv_heads == 8  # the sliding layers'
    types = ["sliding_attention" if w else "full_attention" for w in ours.layer_windows]
    assert types == ref.layer_types and ours.sliding_window == ref.sliding_window == 129
    ropes = ref.rope_parameters
    assert ours.options.layer_rope_thetas == tuple(ropes[t]["rope_theta"] for t in ref.layer_types)
    assert ours.options.rotary_dim == int(192 * 0.334) == 64
    moe = ours.moe
    assert [("sparse" if s else "dense") for s in moe.sparse_layers] == ref.mlp_layer_types
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size) == (8, ref.num_experts_per_tok,
                                                                         ref.moe_intermediate_size)
    assert moe.grouped_sigmoid and moe.renormalize and moe.shared_expert_intermediate_size == 0
    assert (moe.num_groups, moe.topk_groups, moe.routed_scaling_factor) == (1, 1, 1.0)
    assert ours.rms_norm_eps == ref.rms_norm_eps == 1e-5 and not ours.tie_word_embeddings
    assert not (ours.attention_bias or ours.o_proj_bias or ours.mlp_bias or ours.qk_norm)
    assert ours.options.tensor_parallel_refusal


def test_hub_keys():
    m = ModelConfig.from_hf(raw(sliding_window_size=127, routed_scaling_factor=None, attention_value_scale=None,
                                attention_bias=True, layer_types=["full_attention"] * 7))
    assert m.sliding_window is None and m.num_kv_heads == 4  # no sliding layer: the full layers' heads
    m = ModelConfig.from_hf(raw(sliding_window_size=127, routed_scaling_factor=None, attention_value_scale=None,
                                attention_bias=True))
    assert m.sliding_window == 128 and m.moe.routed_scaling_factor == 1.0
    assert m.options.mimo_v2.value_scale == 1.0 and m.attention_bias and not m.o_proj_bias


@pytest.mark.parametrize("extra, match", [
    ({"num_key_value_heads": 3}, r"multiple of twice num_key_value_heads \(3\)"),
    ({"v_head_dim": 256}, r"v_head_dim \(256\) must be in \[1, head_dim \(192\)\]"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "rope_parameters must hold a dict"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          "sliding_attention": {"rope_theta": 1e4}}}, "rope_type 'yarn' is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e4, "partial_rotary_factor": 0.5},
                          "sliding_attention": {"rope_theta": 1e4}}}, r"same even, positive .* \[64, 96\]"),
    ({"layer_types": ["sliding_attention"] * 6}, "layer_types has 6 entries for 7 layers"),
    ({"sliding_window": None}, "sliding_window must be a positive number"),
    ({"mlp_layer_types": ["dense"] * 3}, "mlp_layer_types must give each of the 7 layers"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for mimo_v2_flash"),
    ({"n_group": 8}, "groups of at least 2"),
    ({"quantization_config": {"quant_method": "fp8"}}, f"fp8 {ARCH} checkpoints"),
])
def test_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(**extra))


def test_lora_and_tensor_parallel_refused():
    cfg = ModelConfig.from_hf(raw(head_dim=24, v_head_dim=8, moe_intermediate_size=16, num_experts_per_tok=2))
    with pytest.raises(CheckpointError, match=f"LoRA adapters are not supported for {ARCH}"):
        build_model(cfg, torch.float32, "cpu").enable_lora(1, 4)
    with pytest.raises(TensorParallelConfigError, match="different KV head counts"):
        check(cfg, 2)


def test_mtp_weights_skipped_and_both_sink_names_read(tiny_checkpoints):
    from safetensors.torch import load_file

    ck = load_checkpoint(tiny_checkpoints["mimo_v2_flash"])
    tensors = load_file(str(ck.weight_files[0]))  # the sinks saved by their hub name
    sinks = {n: t for n, t in tensors.items() if "sink" in n}
    assert set(sinks) == {f"model.layers.{i}.self_attn.attention_sink_bias" for i in (0, 2)}
    renamed = {n.replace(".attention_sink_bias", ".sinks"): t for n, t in tensors.items()}  # transformers'
    for named in (tensors, renamed):
        named = {**named, "model.mtp.layers.0.eh_proj.weight": torch.zeros(64, 128)}
        model = build_model(ck.model_config, torch.float32, "cpu")
        model.load_weights(named.items())
        assert torch.equal(model.layers[2].self_attn.sinks, sinks["model.layers.2.self_attn.attention_sink_bias"])
        assert model.layers[1].self_attn.sinks is None


def _logits_with(model, changes: list[tuple[object, str, object]]) -> torch.Tensor:
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


def test_distinctive_features_bind(parity_models):
    # each of them, undone, moves the variant's logits well past the tolerance
    model, ref = parity_models("mimo_v2_flash")
    want = hf_logits(ref, PROMPT)
    attns = [layer.self_attn for layer in model.layers]
    assert [a.num_kv_heads for a in attns] == [4, 2, 4] and [a.repeats for a in attns] == [1, 2, 1]
    assert isinstance(model.layers[0].mlp, SparseMoeBlock) and not isinstance(model.layers[1].mlp, SparseMoeBlock)
    block = model.layers[0].mlp
    undone = {
        "sinks": [(attns[0], "sinks", None), (attns[2], "sinks", None)],
        "value scale": [(a, "value_scale", 1.0) for a in attns],
        "window": [(attns[0], "sliding_window", 0), (attns[2], "sliding_window", 0)],
        "expert groups": [(block, "moe", dataclasses.replace(block.moe, num_groups=1, topk_groups=1))],
        "rope base per layer type": [(model, "_table_of_layer", [model._table_of_layer[1]] * 3)],
    }
    for name, changes in undone.items():
        assert (_logits_with(model, changes) - want).abs().max() > 100 * ATOL, name
