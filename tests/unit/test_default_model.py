"""The built-in default checkpoint: deterministic, small, loadable, safe to
create from several workers at once."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.default_model import DEFAULT_MODEL_NAME, ensure_default_model
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.tokenizer import Tokenizer

EXPECTED_FILES = [
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
]


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_builds_identical_bytes_twice(tmp_path: Path):
    a = ensure_default_model(tmp_path / "a")
    b = ensure_default_model(tmp_path / "b")
    assert a == tmp_path / "a" / DEFAULT_MODEL_NAME
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == EXPECTED_FILES
    assert fa == fb
    assert sum(len(v) for v in fa.values()) < 8 * 2**20


def test_loads_and_generates(tmp_path: Path):
    path = ensure_default_model(tmp_path)
    ck = load_checkpoint(path, require_tokenizer=True)
    cfg = ck.model_config
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 256, 4, 8, 4)
    assert cfg.dtype == "bfloat16" and cfg.tie_word_embeddings
    tok = Tokenizer.from_dir(path)
    assert tok.vocab_size == cfg.vocab_size == 1024
    assert set(tok.eos_token_ids) == set(cfg.eos_token_ids) == {1, 4}
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Light the lamp."}]),
                        add_special_tokens=False)
    assert prompt[0] == tok.bos_token_id

    model = load_model(ck, torch.float32)
    n, bs = len(prompt), 16
    kv = torch.zeros(cfg.num_layers, 2, 4, bs, cfg.num_kv_heads, cfg.head_dim)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(4, dtype=torch.int32)[None],
        cu_query_lens=torch.tensor([0, n], dtype=torch.int32),
        context_lens=torch.tensor([n], dtype=torch.int32), decode_only=False,
    )
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(prompt), torch.arange(n), kv, meta))
    assert logits.shape == (n, 1024) and torch.isfinite(logits).all()
    top2 = logits[-1].topk(2).values
    assert top2[0] - top2[1] > 1e-3  # greedy is not a coin toss between near-equal logits
    assert isinstance(tok.decode([int(logits[-1].argmax())]), str)


def test_env_override_and_reuse(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path / "cache"))
    path = ensure_default_model()
    assert path == tmp_path / "cache" / DEFAULT_MODEL_NAME
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt


def test_concurrent_first_use_ends_with_one_complete_copy(tmp_path: Path):
    start = threading.Barrier(3)
    results: list[Path] = []

    def worker() -> None:
        start.wait()
        results.append(ensure_default_model(tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [tmp_path / DEFAULT_MODEL_NAME] * 3
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_NAME]  # no temp folders left
    assert sorted(_files(results[0])) == EXPECTED_FILES
