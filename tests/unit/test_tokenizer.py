"""Tokenizer and chat template against transformers' fast tokenizer loaded
from the same folder; incremental detokenization on multi-byte text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.fixtures.checkpoints import hf_tokenizer

TEXTS = [
    "The keeper lit the lamp.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Café naïve façade — 21 °C, 5 € / £4",
    "こんにちは 你好 😊👍🏽 mixed with English",
    "special <s> and <|im_start|>user</s> inside text",
    "",
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def ref(tiny_tokenizer_dir: Path):
    return hf_tokenizer(tiny_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, ref, text):
    for add in (True, False):
        ids = tok.encode(text, add_special_tokens=add)
        assert ids == ref.encode(text, add_special_tokens=add)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    plain = text.replace("<s>", "").replace("<|im_start|>", "").replace("</s>", "")
    assert tok.decode(tok.encode(plain)) == plain


def test_special_token_properties(tok, ref):
    assert tok.vocab_size == len(ref)
    assert tok.bos_token_id == ref.bos_token_id == 0
    assert tok.eos_token_ids[0] == ref.eos_token_id == 1
    assert tok.pad_token_id == ref.pad_token_id == 2
    assert tok.encode("hi")[0] == tok.bos_token_id  # the post-processor adds BOS
    assert {0, 1, 2, 3, 4} <= tok.special_token_ids


def _variant(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(config_changes)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_eos_token": True}])
def test_bos_comes_from_tokenizer_json_not_config_flags(tiny_tokenizer_dir, tmp_path, flags):
    # transformers >= 5 ignores add_bos_token/add_eos_token when tokenizer.json exists
    path = _variant(tiny_tokenizer_dir, tmp_path / "tok", **flags)
    ours, theirs = Tokenizer.from_dir(path), hf_tokenizer(path)
    for text in TEXTS[:3]:
        assert ours.encode(text) == theirs.encode(text)
    assert ours.encode("lamp")[0] == 0 and ours.encode("lamp")[-1] != 1


def test_no_post_processor_adds_nothing(tiny_tokenizer_dir, tmp_path):
    path = _variant(tiny_tokenizer_dir, tmp_path / "tok", add_bos_token=True)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(spec))
    ours, theirs = Tokenizer.from_dir(path), hf_tokenizer(path)
    assert ours.encode("lamp") == theirs.encode("lamp") == ours.encode("lamp", add_special_tokens=False)
    assert ours.encode("lamp")[0] != 0


def test_tokens_declared_only_in_config_are_added(tiny_tokenizer_dir, tmp_path):
    added = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    added["512"] = {"content": "<|tool|>", "special": True, "normalized": False,
                    "lstrip": False, "rstrip": False, "single_word": False}
    path = _variant(tiny_tokenizer_dir, tmp_path / "tok", added_tokens_decoder=added)
    ours, theirs = Tokenizer.from_dir(path), hf_tokenizer(path)
    assert ours.vocab_size == len(theirs) == 513
    ids = ours.encode("call <|tool|> now")
    assert ids == theirs.encode("call <|tool|> now") and 512 in ids
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == "call  now"


def test_eos_ids_include_generation_config(tiny_tokenizer_dir, tmp_path):
    path = Path(shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 1]}))
    assert Tokenizer.from_dir(path).eos_token_ids == (1, 4)


CONVERSATIONS = {
    "simple": [{"role": "user", "content": "Hello there"}],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is bread?"},
        {"role": "assistant", "content": "Flour, water, salt, time."},
        {"role": "user", "content": "And yeast? 😊"},
    ],
    "content_parts": [{"role": "user", "content": [{"type": "text", "text": "part one, "},
                                                   {"type": "text", "text": "part two"}]}],
    "none_content": [{"role": "user", "content": "call it"},
                     {"role": "assistant", "content": None, "tool_calls": None}],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(tok, ref, name, gen_prompt):
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen_prompt)
    theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    assert ours == theirs
    assert ours.startswith("<s><|im_start|>") and ours.endswith("assistant\n") == gen_prompt


def test_encode_chat_matches_transformers_tokenized_template(tok, ref):
    messages = CONVERSATIONS["multi_turn"]
    ids = tok.encode_chat(messages)
    assert ids == ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one


def test_chat_template_with_tools_matches_transformers(tok, ref):
    tools = [{"type": "function", "function": {"name": "lamp", "description": "Light <the> lamp ünïcode",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = CONVERSATIONS["simple"]
    ours = tok.apply_chat_template(messages, tools=tools)
    assert ours == ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '"Light <the> lamp ünïcode"' in ours  # JSON, not HTML-escaped or ASCII-escaped


def test_chat_template_helpers_and_file_match_transformers(tiny_tokenizer_dir, tmp_path):
    # transformers >= 4.43 stores the template in chat_template.jinja, which wins over the config
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}[{{ m.role | upper }}]{{ m.content | tojson(indent=1) }}{% endgeneration %}"
        "{% endfor %}{{ eos_token }}{{ strftime_now('%Y') | length }}{{ flavour }}"
    )
    path = Path(shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok"))
    (path / "chat_template.jinja").write_text(template)
    messages = CONVERSATIONS["multi_turn"]
    ours = Tokenizer.from_dir(path).apply_chat_template(messages, flavour="rye")
    assert ours == hf_tokenizer(path).apply_chat_template(messages, tokenize=False, flavour="rye")
    assert ours == '[SYSTEM]"Be brief."[USER]"What is bread?"</s>4rye'


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": ["text"]}], r"content parts must be objects"),
        ([{"role": "wizard", "content": "hi"}], "rejected the messages: unknown role wizard"),
    ],
)
def test_bad_messages_raise_invalid_request(tok, messages, match):
    with pytest.raises(InvalidRequestError, match=match) as err:
        tok.apply_chat_template(messages)
    assert err.value.param == "messages"


def test_bad_tools_and_missing_template(tok, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(InvalidRequestError, match="tools must be a list") as err:
        tok.apply_chat_template(CONVERSATIONS["simple"], tools={"name": "x"})
    assert err.value.param == "tools"
    path = _variant(tiny_tokenizer_dir, tmp_path / "tok", chat_template=None)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer.from_dir(path).apply_chat_template(CONVERSATIONS["simple"])


def test_template_sandbox_blocks_python_internals(tiny_tokenizer_dir, tmp_path):
    path = _variant(tiny_tokenizer_dir, tmp_path / "tok",
                    chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequestError, match="rejected the messages"):
        Tokenizer.from_dir(path).apply_chat_template(CONVERSATIONS["simple"])


# --- incremental detokenization --------------------------------------------

MULTIBYTE = "Tea 🍵 and 你好世界, then 😊👍🏽 — café. Done!"


def _stream(tok: Tokenizer, prompt: list[int], output: list[int], chunk: int, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.step(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    return deltas + [detok.flush()]


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_incremental_detokenizer_never_splits_characters(tok, chunk):
    prompt = tok.encode("A prompt:")
    output = tok.encode(" " + MULTIBYTE, add_special_tokens=False)
    # the tiny vocabulary spells emoji and CJK byte by byte, so splits happen
    assert len(output) > len(" " + MULTIBYTE.encode().decode())
    deltas = _stream(tok, prompt, output, chunk)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(output) == " " + MULTIBYTE
    if chunk == 1:
        assert deltas.count("") >= 4  # bytes of an unfinished character were held back


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_special_tokens(tok, skip):
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    output = tok.encode("Hi 你好<|im_end|>\n</s>", add_special_tokens=False)
    deltas = _stream(tok, prompt, output, 1, skip)
    assert "".join(deltas) == tok.decode(output, skip_special_tokens=skip)
    assert ("<|im_end|>" in "".join(deltas)) == (not skip)


def test_incremental_detokenizer_flushes_an_unfinished_character(tok):
    cut = tok.encode("ok 😊", add_special_tokens=False)[:-1]  # drop the emoji's last byte
    detok = IncrementalDetokenizer(tok, [])
    streamed = "".join(detok.step([i]) for i in cut)
    assert streamed == "ok "
    tail = detok.flush()
    assert tail.endswith("\ufffd") and streamed + tail == tok.decode(cut)
    assert detok.output_ids == cut


def test_invalid_bytes_stream_one_step_late_not_at_the_end(tok):
    """A lone continuation byte can never complete a character: a model
    emitting such bytes streams its U+FFFDs as it goes (each held one step,
    as an unfinished character would be), and a character cut across
    tokens after them is still never split."""
    cont = tok.encode("😊", add_special_tokens=False)[-1]  # the emoji's last byte
    assert tok.decode([cont]) == "\ufffd"  # byte by byte in the tiny vocabulary
    after = tok.encode(" ok 你好", add_special_tokens=False)
    output = [cont] * 6 + after
    detok = IncrementalDetokenizer(tok, tok.encode("A prompt:"))
    deltas = [detok.step([i]) for i in output] + [detok.flush()]
    assert deltas[0] == "" and deltas[1:6] == ["\ufffd"] * 5
    assert "".join(deltas) == tok.decode(output)
    assert not any(d.endswith("\ufffd") for d in deltas[6:])  # 你好 never split
    assert deltas[6].startswith("\ufffd")  # the sixth byte, released by the text after it
