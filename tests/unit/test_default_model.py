"""The shipped default model pair: standard Llama checkpoints with one
tokenizer, loadable by the engine, matching transformers, and trained (their
held-out perplexity is far below a random model's, which is about the
vocabulary size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitserve.engine import default_model as dm
from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.tokenizer import Tokenizer

EXPECTED_FILES = [
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
]
# (hidden, layers, heads, kv heads), and a bound on the perplexity of the
# held-out text's first SCORED tokens: measured 73.4 (target) and 94.2
# (draft); random weights give about the vocabulary size, 4096
SHAPES = {dm.DEFAULT_MODEL_NAME: ((256, 6, 8, 4), 80.0), dm.DEFAULT_DRAFT_NAME: ((128, 2, 4, 2), 100.0)}
SCORED = 256


def _paths() -> list[Path]:
    return [dm.default_model_path(), dm.default_draft_path()]


def test_pair_is_two_standard_checkpoints_with_one_tokenizer():
    target, draft = _paths()
    assert (target.name, draft.name) == (dm.DEFAULT_MODEL_NAME, dm.DEFAULT_DRAFT_NAME)
    for path in (target, draft):
        assert sorted(f.name for f in path.iterdir()) == EXPECTED_FILES
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
        assert tok_cfg["chat_template"] == dm.CHAT_TEMPLATE
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (target / name).read_bytes() == (draft / name).read_bytes()
    size = sum(f.stat().st_size for p in (target, draft) for f in p.iterdir())
    assert size < 16 * 2**20


def test_missing_files_are_named(tmp_path: Path, monkeypatch):
    (tmp_path / dm.DEFAULT_MODEL_NAME).mkdir()
    (tmp_path / dm.DEFAULT_MODEL_NAME / "config.json").write_text("{}")
    monkeypatch.setattr(dm, "PACKAGE_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="lacks generation_config.json, model.safetensors"):
        dm.default_model_path()


def _score(model, cfg, ids: list[int]) -> torch.Tensor:
    """Prefill logits of ``ids`` through the engine's model: [n, vocab]."""
    n, bs = len(ids), 16
    blocks = (n + bs - 1) // bs
    kv = torch.zeros(cfg.num_layers, 2, blocks, bs, cfg.num_kv_heads, cfg.head_dim)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        cu_query_lens=torch.tensor([0, n], dtype=torch.int32),
        context_lens=torch.tensor([n], dtype=torch.int32), decode_only=False,
    )
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), kv, meta))


@pytest.mark.parametrize("name", list(SHAPES))
def test_loads_matches_transformers_and_is_trained(name: str):
    from transformers import LlamaForCausalLM

    path = dm.PACKAGE_DIR / name
    (shape, ppl_bound) = SHAPES[name]
    ck = load_checkpoint(path, require_tokenizer=True)
    cfg = ck.model_config
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", *shape)
    assert cfg.dtype == "bfloat16" and cfg.tie_word_embeddings
    tok = Tokenizer.from_dir(path)
    assert tok.vocab_size == cfg.vocab_size == 4096
    assert set(tok.eos_token_ids) == set(cfg.eos_token_ids) == {1, 4}
    ids = tok.encode(dm.HELDOUT_PATH.read_text(encoding="utf-8")[:4000])[:SCORED + 1]
    assert ids[0] == tok.bos_token_id and len(ids) == SCORED + 1

    logits = _score(load_model(ck, torch.float32), cfg, ids)
    ref = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, want, atol=2e-3, rtol=1e-3)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert float(nll.exp()) < ppl_bound
