"""The built-in default model: a small random-weight Llama checkpoint.

Lets every part of splitserve run end to end with no download: on first use
it is generated deterministically (fixed seeds, torch + safetensors +
tokenizers only) into ``~/.cache/splitserve/default-model-v1`` (base folder
overridden by ``SPLITSERVE_CACHE``). Its output is meaningless text; its
shapes, files and tokenizer are those of a real Llama checkpoint.

The tokenizer is byte-level BPE trained on ``default_corpus.txt``; the test
fixtures reuse ``train_bpe_tokenizer`` and ``write_tokenizer_files``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_MODEL_NAME = "default-model-v1"
CORPUS_PATH = Path(__file__).with_name("default_corpus.txt")

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

# hidden 256, 4 layers, 8 heads / 4 kv heads: ~2.5M parameters, ~5 MB in bf16.
DEFAULT_SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=4)
DEFAULT_VOCAB_TARGET = 1024
WEIGHT_STD = 0.08  # wide enough that greedy logits are not near-ties
SEED = 0


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


def _llama_config(vocab_size: int, eos_ids: list[int]) -> dict[str, Any]:
    s = DEFAULT_SHAPE
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": s["hidden_size"],
        "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_layers"],
        "num_attention_heads": s["num_heads"],
        "num_key_value_heads": s["num_kv_heads"],
        "head_dim": s["hidden_size"] // s["num_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": eos_ids,
        "torch_dtype": "bfloat16",
    }


def _random_weights(vocab_size: int) -> dict[str, torch.Tensor]:
    s = DEFAULT_SHAPE
    h, i = s["hidden_size"], s["intermediate_size"]
    d = h // s["num_heads"]
    gen = torch.Generator().manual_seed(SEED)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * WEIGHT_STD).to(torch.bfloat16)

    def norm_weight() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16)

    weights = {"model.embed_tokens.weight": normal(vocab_size, h)}
    for layer in range(s["num_layers"]):
        p = f"model.layers.{layer}"
        weights[f"{p}.input_layernorm.weight"] = norm_weight()
        weights[f"{p}.self_attn.q_proj.weight"] = normal(s["num_heads"] * d, h)
        weights[f"{p}.self_attn.k_proj.weight"] = normal(s["num_kv_heads"] * d, h)
        weights[f"{p}.self_attn.v_proj.weight"] = normal(s["num_kv_heads"] * d, h)
        weights[f"{p}.self_attn.o_proj.weight"] = normal(h, s["num_heads"] * d)
        weights[f"{p}.post_attention_layernorm.weight"] = norm_weight()
        weights[f"{p}.mlp.gate_proj.weight"] = normal(i, h)
        weights[f"{p}.mlp.up_proj.weight"] = normal(i, h)
        weights[f"{p}.mlp.down_proj.weight"] = normal(h, i)
    weights["model.norm.weight"] = norm_weight()
    return weights


def build_default_model(out: Path) -> None:
    """Write the default checkpoint's files into the existing folder ``out``."""
    tok = train_bpe_tokenizer(CORPUS_PATH.read_text(encoding="utf-8"), DEFAULT_VOCAB_TARGET)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_ids = [tok.token_to_id(EOS), tok.token_to_id(IM_END)]
    write_tokenizer_files(out, tok)
    _write_json(out / "config.json", _llama_config(vocab_size, eos_ids))
    _write_json(out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": eos_ids})
    save_file(_random_weights(vocab_size), str(out / "model.safetensors"), metadata={"format": "pt"})


def default_cache_dir() -> Path:
    env = os.environ.get("SPLITSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitserve"


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The default checkpoint's folder, generating it on first use.

    Built in a private temporary folder and renamed into place, so a reader
    never sees a half-written checkpoint and concurrent first uses (several
    workers starting at once) all end with the same complete folder."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = base / DEFAULT_MODEL_NAME
    if final.is_dir():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=base))
    try:
        build_default_model(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
