"""The built-in default model pair: a small trained Llama checkpoint and its draft.

Lets every part of splitserve run end to end with no download. Both
checkpoints are shipped in this package (bf16, standard Hugging Face Llama
files) and returned in place; nothing is generated at run time:

- ``default_model_path()``: the target, ``default-model-v2`` (hidden 256,
  6 layers, ~5.8M parameters);
- ``default_draft_path()``: its draft for speculative decoding,
  ``default-draft-v2`` (hidden 128, 2 layers, ~0.9M parameters), with the
  same tokenizer.

They were trained on the Python standard library's source and pydoc text by
``scripts/train_default_model.py``, so they continue English prose and
Python code recognisably (small models: fluent-looking, often wrong).
``heldout.txt`` is the documents kept out of training, the reference for
their perplexity (``benchmarks/bench_default_model.py``).

The tokenizer is byte-level BPE with SPECIAL_TOKENS as ids 0..4 and the
ChatML CHAT_TEMPLATE; the test fixtures reuse ``train_bpe_tokenizer`` and
``write_tokenizer_files`` (on ``default_corpus.txt``) for their own tiny
checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_MODEL_NAME = "default-model-v2"
DEFAULT_DRAFT_NAME = "default-draft-v2"
PACKAGE_DIR = Path(__file__).parent
CORPUS_PATH = PACKAGE_DIR.parent / "default_corpus.txt"
HELDOUT_PATH = PACKAGE_DIR / "heldout.txt"

BOS, EOS, PAD, IM_START, IM_END = "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)  # ids 0..4, in this order

# ChatML turns after BOS; tools, when given, go into a leading system turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|im_start|>system\\nTools:\\n' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + message.role) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message.role + '\\n' }}"
    "{% if message.content is string %}{{ message.content }}"
    "{% elif message.content %}{% for part in message.content %}{{ part.text }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (the Llama 3 / Qwen scheme) trained on ``text``, with
    SPECIAL_TOKENS as ids 0..4 and BOS prepended by the post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def write_tokenizer_files(out: Path, tok: Tokenizer, chat_template: str = CHAT_TEMPLATE) -> None:
    """tokenizer.json and tokenizer_config.json as transformers would save them."""
    tok.save(str(out / "tokenizer.json"), pretty=True)
    added = {
        str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out / "tokenizer_config.json", config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json")


def _shipped(name: str) -> Path:
    path = PACKAGE_DIR / name
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the default checkpoint {path} lacks {', '.join(missing)}: "
                                "reinstall splitserve (or check out its files in full)")
    return path


def default_model_path() -> Path:
    """The shipped default target checkpoint's folder (read-only use)."""
    return _shipped(DEFAULT_MODEL_NAME)


def default_draft_path() -> Path:
    """The shipped draft checkpoint's folder: same tokenizer as the target."""
    return _shipped(DEFAULT_DRAFT_NAME)
