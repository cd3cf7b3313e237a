"""Checkpoint loading: the happy path, and one test per way a checkpoint can
be broken, each checking the CheckpointError names the file or tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.tokenizer import Tokenizer

DOWN_PROJ = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def ckpt(tiny_llama: Path, tmp_path: Path) -> Path:
    """A private, editable copy of the tiny llama checkpoint."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "ckpt"))


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path: Path, fn) -> None:
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_loads_metadata_and_weights(ckpt: Path):
    ck = load_checkpoint(ckpt)
    assert ck.path == ckpt and ck.has_tokenizer
    assert ck.weight_files == (ckpt / "model.safetensors",)
    cfg = ck.model_config
    assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 2, 4, 2, 16)
    assert ck.generation_config["eos_token_id"] == 1
    model = load_model(ck, torch.float32)
    expected = load_file(ckpt / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"]
    qkv = model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(qkv[64:96], expected)  # k rows follow the 64 q rows


def test_missing_directory(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"nowhere.*does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_config(ckpt: Path):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        load_checkpoint(ckpt)


def test_invalid_config_json(ckpt: Path):
    (ckpt / "config.json").write_text('{"architectures": [')
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        load_checkpoint(ckpt)


def test_config_missing_required_key(ckpt: Path):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: missing required key 'hidden_size'"):
        load_checkpoint(ckpt)


def test_unsupported_architecture(ckpt: Path):
    edit_config(ckpt, architectures=["T5ForConditionalGeneration"])
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported architecture.*T5ForConditionalGeneration"):
        load_checkpoint(ckpt)


def test_unsupported_rope_scaling(ckpt: Path):
    # every scaling type transformers defines is served: an unknown one stands in
    edit_config(ckpt, rope_parameters={"rope_type": "no_such_scaling", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(CheckpointError, match=r"config\.json: rope scaling type 'no_such_scaling'"):
        load_checkpoint(ckpt)


def test_no_weights_file(ckpt: Path):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no weights file \(model\.safetensors.*pytorch_model\.bin"):
        load_checkpoint(ckpt)


def test_index_names_missing_shard(tiny_checkpoints, tmp_path: Path):
    ckpt = Path(shutil.copytree(tiny_checkpoints["llama_sharded"], tmp_path / "sharded"))
    shards = sorted(ckpt.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: names shard '{shards[-1].name}'"):
        load_checkpoint(ckpt)


def test_invalid_index_json(tiny_checkpoints, tmp_path: Path):
    ckpt = Path(shutil.copytree(tiny_checkpoints["llama_sharded"], tmp_path / "sharded"))
    (ckpt / "model.safetensors.index.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: invalid JSON"):
        load_checkpoint(ckpt)


def test_missing_tensor(ckpt: Path):
    edit_weights(ckpt, lambda t: t.pop(DOWN_PROJ))
    ck = load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) for LlamaForCausalLM: '{DOWN_PROJ}'"):
        load_model(ck, torch.float32)


def test_unexpected_tensor(ckpt: Path):
    edit_weights(ckpt, lambda t: t.update({"model.layers.7.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.7\.mlp\.extra"):
        load_model(load_checkpoint(ckpt), torch.float32)


def test_tensor_shape_mismatch(ckpt: Path):
    edit_weights(ckpt, lambda t: t.update({DOWN_PROJ: torch.zeros(64, 100)}))
    with pytest.raises(
        CheckpointError, match=rf"model\.safetensors: tensor '{DOWN_PROJ}': expected shape \[64, 128\], got \[64, 100\]"
    ):
        load_model(load_checkpoint(ckpt), torch.float32)


def test_fused_slice_shape_mismatch(ckpt: Path):
    # k_proj lands in rows of the fused qkv weight: checked against its slice, not the whole
    edit_weights(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight': expected shape \[32, 64\]"):
        load_model(load_checkpoint(ckpt), torch.float32)


def test_quantized_tensor(ckpt: Path):
    edit_weights(ckpt, lambda t: t.update({DOWN_PROJ: torch.zeros(64, 128, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=rf"'{DOWN_PROJ}' has dtype torch\.int8"):
        load_model(load_checkpoint(ckpt), torch.float32)


def test_corrupt_safetensors_file(ckpt: Path):
    (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file"):
        load_model(load_checkpoint(ckpt), torch.float32)


def test_tokenizer_json_missing(ckpt: Path):
    (ckpt / "tokenizer.json").unlink()
    assert load_checkpoint(ckpt).has_tokenizer is False  # workers fed token ids need none
    with pytest.raises(CheckpointError, match=r"tokenizer\.json not found"):
        load_checkpoint(ckpt, require_tokenizer=True)
    with pytest.raises(CheckpointError, match=r"ckpt: tokenizer\.json not found"):
        Tokenizer.from_dir(ckpt)


def test_tied_checkpoint_with_redundant_lm_head_loads(tiny_checkpoints, tmp_path: Path):
    ckpt = Path(shutil.copytree(tiny_checkpoints["llama_tied"], tmp_path / "tied"))
    edit_weights(ckpt, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = load_model(load_checkpoint(ckpt), torch.float32)
    assert model.lm_head_weight is model.embed_tokens
