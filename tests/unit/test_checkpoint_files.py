from pathlib import Path

import pytest

from splitserve.engine.checkpoint_files import read_json
from splitserve.engine.errors import CheckpointError


def test_reads_a_json_object(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"a": 1, "b": ["é"]}', encoding="utf-8")
    assert read_json(tmp_path / "config.json", "model config") == {"a": 1, "b": ["é"]}


def test_a_required_file_must_exist(tmp_path: Path):
    with pytest.raises(CheckpointError) as e:
        read_json(tmp_path / "config.json", "model config")
    assert str(e.value) == f"{tmp_path}: model config config.json not found"


def test_an_optional_file_may_be_absent(tmp_path: Path):
    assert read_json(tmp_path / "generation_config.json", "generation config", required=False) == {}


@pytest.mark.parametrize("required", [True, False])
def test_invalid_json_names_the_file(tmp_path: Path, required: bool):
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(CheckpointError, match=r"^.*tokenizer_config\.json: invalid JSON: "):
        read_json(tmp_path / "tokenizer_config.json", "tokenizer config", required=required)
    (tmp_path / "tokenizer_config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: invalid JSON: "):
        read_json(tmp_path / "tokenizer_config.json", "tokenizer config", required=required)


@pytest.mark.parametrize("required", [True, False])
def test_anything_but_an_object_is_refused(tmp_path: Path, required: bool):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError) as e:
        read_json(tmp_path / "config.json", "model config", required=required)
    assert str(e.value) == f"{tmp_path / 'config.json'}: expected a JSON object, got list"
