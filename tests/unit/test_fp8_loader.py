"""Reading fp8 checkpoints: the quantization_config formats accepted and
refused, each tensor's scale groups from its scale's shape, how fused
projections lay out their shards' scales, where the scales land, and one
test per way an fp8 checkpoint can be broken (each CheckpointError names
what is wrong)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.quantization import (
    Fp8Weight,
    QuantizationConfig,
    checkpoint_groups,
    fused_groups,
    parse_quantization_config,
)
from splitserve.kernels.fp8_gemm import dequantize_weight
from tests.fixtures.fp8_checkpoints import write_fp8_checkpoint

Q_PROJ = "model.layers.0.self_attn.q_proj"
K_PROJ = "model.layers.0.self_attn.k_proj"


def ct_config(**weights) -> dict:
    w = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    w.update(weights)
    return {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w,
                                      "input_activations": {"num_bits": 8, "type": "float",
                                                            "dynamic": True}}}}}


def test_parses_hf_fp8_and_compressed_tensors():
    q = parse_quantization_config({"quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}, "c")
    assert (q.method, q.activation_scheme, q.weight_block_size) == ("fp8", "dynamic", (128, 128))
    q = parse_quantization_config({"quantization_config": {"quant_method": "fp8",
                                                           "activation_scheme": "static"}}, "c")
    assert (q.activation_scheme, q.weight_block_size) == ("static", None)
    q = parse_quantization_config(ct_config(strategy="block", block_structure=[128, 128]), "c")
    assert (q.method, q.weight_block_size, q.activation_scheme) == ("compressed-tensors", (128, 128), "dynamic")
    assert parse_quantization_config({}, "c") is None


@pytest.mark.parametrize("config, message", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, r"quantized checkpoint \(quant_method 'gptq'\) is not supported"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
     r"weight_block_size must be two positive integers"),
    ({"quantization_config": {"quant_method": "fp8", "scale_fmt": "ue8m0"}}, r"scale_fmt 'ue8m0'"),
    (ct_config(type="int"), r"8-bit 'int' weights are not supported"),
    (ct_config(num_bits=4), r"4-bit 'float' weights"),
    (ct_config(symmetric=False), r"asymmetric \(zero-point\) weights"),
    (ct_config(strategy="tensor_group"), r"strategy 'tensor_group' is not supported"),
    ({"quantization_config": {**ct_config()["quantization_config"], "format": "pack-quantized"}},
     r"format 'pack-quantized' is not supported"),
    ({"quantization_config": {**ct_config()["quantization_config"], "kv_cache_scheme": {"num_bits": 8}}},
     r"kv_cache_scheme is not supported"),
])
def test_refuses_other_quantization(config, message):
    with pytest.raises(CheckpointError, match=message):
        parse_quantization_config(config, "config.json")


BLOCK128 = QuantizationConfig("fp8", "dynamic", weight_block_size=(128, 128))


@pytest.mark.parametrize("weight, scale, groups", [
    ([256, 512], [], (256, 512)),  # per tensor: a scalar...
    ([256, 512], [1], (256, 512)),  # ...or one element
    ([256, 512], [256, 1], (1, 512)),  # per output channel
    ([256, 512], [256], (1, 512)),
    ([256, 512], [2, 4], (128, 128)),  # 128x128 blocks
    ([200, 300], [2, 3], (128, 128)),  # ragged edges: ceil
    ([256, 512], [256, 4], (1, 128)),  # groups of 128 along the input
])
def test_scale_groups_from_scale_shape(weight, scale, groups):
    assert checkpoint_groups("w", weight, scale, BLOCK128) == groups


def test_scale_of_no_known_shape_is_refused():
    with pytest.raises(CheckpointError, match=r"'w' \[256, 512\] has a scale of shape \[3, 3\]"):
        checkpoint_groups("w", [256, 512], [3, 3], BLOCK128)


def w(groups) -> Fp8Weight:
    return Fp8Weight(groups, "s")


def test_fused_groups():
    k = 4096
    # q/k/v of 4096/1024/1024 rows on 128-row blocks: shard edges on block edges
    assert fused_groups([("q", 4096, w((128, 128))), ("k", 1024, w((128, 128))),
                         ("v", 1024, w((128, 128)))], k) == (128, 128)
    # 64/32/32 rows: the blocks do not line up, so one scale row per weight row
    assert fused_groups([("q", 64, w((128, 128))), ("k", 32, w((128, 128))),
                         ("v", 32, w((128, 128)))], 64) == (1, 64)
    # per-tensor gate and up of equal size: one scale row each; q/k/v of unequal sizes: per row
    assert fused_groups([("g", 512, w((512, k))), ("u", 512, w((512, k)))], k) == (512, k)
    assert fused_groups([("q", 64, w((64, k))), ("k", 32, w((32, k)))], k) == (1, k)
    assert fused_groups([("o", 256, w((256, k)))], k) == (256, k)  # unfused per-tensor: [1, 1]
    assert fused_groups([("q", 64, None), ("k", 32, None)], k) is None
    with pytest.raises(CheckpointError, match=r"\['q'\] are fp8 but \['k'\]"):
        fused_groups([("q", 64, w((1, k))), ("k", 32, None)], k)
    with pytest.raises(CheckpointError, match=r"group the inputs differently"):
        fused_groups([("q", 64, w((1, k))), ("k", 32, w((32, 32)))], k)


@pytest.fixture(scope="module")
def fp8_block32(tiny_checkpoints, tmp_path_factory) -> Path:
    return write_fp8_checkpoint(tiny_checkpoints["llama"], tmp_path_factory.mktemp("b32") / "c",
                                "fp8_block", block=32)


@pytest.fixture
def broken(fp8_block32: Path, tmp_path: Path) -> Path:
    """A private, editable copy of the 32-block fp8 llama checkpoint."""
    return Path(shutil.copytree(fp8_block32, tmp_path / "ckpt"))


def edit_weights(path: Path, fn) -> None:
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_scales_land_where_their_rows_are(fp8_block32: Path, tiny_checkpoints):
    ck = load_checkpoint(fp8_block32)
    assert ck.model_config.quantization.weights[f"{Q_PROJ}.weight"] == Fp8Weight(
        (32, 32), f"{Q_PROJ}.weight_scale_inv", (64, 64))
    model = load_model(ck, torch.float32)
    attn = model.layers[0].self_attn
    assert attn.qkv_proj.fp8_groups == (32, 32)  # q 64 / k 32 / v 32 rows: blocks kept
    assert attn.qkv_proj.weight_scale.shape == (4, 2)
    tensors = load_file(fp8_block32 / "model.safetensors")
    fused = dequantize_weight(attn.qkv_proj.weight, attn.qkv_proj.weight_scale, 32, 32)
    for name, rows in ((Q_PROJ, slice(0, 64)), (K_PROJ, slice(64, 96))):
        want = dequantize_weight(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"], 32, 32)
        assert torch.equal(fused[rows], want), name
    # full-precision weights stay as they were: embeddings, norms, the vocabulary projection
    full = load_file(tiny_checkpoints["llama"] / "model.safetensors")
    assert torch.equal(model.embed_tokens, full["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head, full["lm_head.weight"])


def test_fp8_projections_take_a_quarter_of_float32(fp8_block32: Path, tiny_checkpoints):
    def projection_bytes(model):
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if "proj" in n)

    fp8 = projection_bytes(load_model(load_checkpoint(fp8_block32), torch.float32))
    full = projection_bytes(load_model(load_checkpoint(tiny_checkpoints["llama"]), torch.float32))
    assert full / 4 < fp8 < full / 4 * 1.05  # plus one float32 scale per 32x32 block


def test_fp8_tensor_without_quantization_config(broken: Path):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["quantization_config"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*_proj\.weight' is "
                       r"torch\.float8_e4m3fn where torch\.float32 is expected: fp8 tensors need a "
                       r"quantization_config"):
        load_model(load_checkpoint(broken), torch.float32)


def test_missing_scale(broken: Path):
    edit_weights(broken, lambda t: t.pop(f"{K_PROJ}.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"ckpt: fp8 tensor '{K_PROJ}\.weight' has no scale"):
        load_checkpoint(broken)


def test_scale_of_wrong_shape(broken: Path):
    edit_weights(broken, lambda t: t.update({f"{K_PROJ}.weight_scale_inv": torch.ones(3, 3)}))
    with pytest.raises(CheckpointError, match=rf"'{K_PROJ}\.weight' \[32, 64\] has a scale of shape \[3, 3\]"):
        load_checkpoint(broken)


def test_half_of_a_fused_projection_in_fp8(broken: Path):
    def dequantize_k(t):
        t[f"{K_PROJ}.weight"] = t[f"{K_PROJ}.weight"].float()
        del t[f"{K_PROJ}.weight_scale_inv"]
    edit_weights(broken, dequantize_k)
    with pytest.raises(CheckpointError, match=r"\['model\.layers\.0\.self_attn\.q_proj\.weight', "
                       r"'model\.layers\.0\.self_attn\.v_proj\.weight'\] are fp8 but "
                       r"\['model\.layers\.0\.self_attn\.k_proj\.weight'\]"):
        load_model(load_checkpoint(broken), torch.float32)


def test_e5m2_weights(broken: Path):
    edit_weights(broken, lambda t: t.update({f"{K_PROJ}.weight": t[f"{K_PROJ}.weight"].float().to(
        torch.float8_e5m2)}))
    with pytest.raises(CheckpointError, match=rf"'{K_PROJ}\.weight' is F8_E5M2"):
        load_checkpoint(broken)


def test_config_says_fp8_but_no_tensor_is(tiny_checkpoints, tmp_path: Path):
    ckpt = Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "ckpt"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"ckpt: quantization_config says fp8, but no tensor"):
        load_checkpoint(ckpt)


def test_fp8_vocabulary_projection_is_refused(broken: Path):
    def quantize_lm_head(t):
        t["lm_head.weight"] = t["lm_head.weight"].to(torch.float8_e4m3fn)
        t["lm_head.weight_scale_inv"] = torch.ones(())
    edit_weights(broken, quantize_lm_head)
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' is torch\.float8_e4m3fn where "
                       r"torch\.float32 is expected"):
        load_model(load_checkpoint(broken), torch.float32)
