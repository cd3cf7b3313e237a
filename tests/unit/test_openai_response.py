"""Choice objects of the OpenAI API built from backend outputs (the HTTP
tests cover the common paths; these pin down echo's edges)."""

import pytest

from splitserve.cluster.api.openai_response import (ChoiceState, Echo, chat_logprobs, completion_logprobs,
                                                     token_text)
from splitserve.cluster.api.tokenize_api import detokenize_text
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.tokenizer import Tokenizer


def out(text, token_ids, finished=False, prompt_logprobs=None, logprobs=None):
    d = {"text": text, "token_ids": token_ids, "finished": finished,
         "finish_reason": "length" if finished else None, "prompt_tokens": 3,
         "completion_tokens": len(token_ids), "cached_tokens": 0,
         "logprobs": logprobs or [{"token_id": t, "logprob": -1.0, "top": []} for t in token_ids]}
    if prompt_logprobs is not None:
        d["prompt_logprobs"] = prompt_logprobs
    return d


PROMPT_LPS = [None, {"token_id": 6, "logprob": -2.0, "top": [[6, -2.0]]},
              {"token_id": 7, "logprob": -3.0, "top": [[9, -0.5]]}]


def test_echo_scores_are_sent_even_when_the_first_output_holds_its_text(tiny_llama):
    tok = Tokenizer.from_dir(tiny_llama)
    st = ChoiceState(0, "completion", tok, True, echo=Echo("", [5, 6, 7], score_only=False))
    first = st.add(out("", [8], prompt_logprobs=PROMPT_LPS))  # text held back, not finished
    assert first is not None
    lp = first["logprobs"]
    assert lp["token_logprobs"][:3] == [None, -2.0, -3.0] and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == 4
    last = st.add(out("x", [9], finished=True))
    assert len(last["logprobs"]["tokens"]) == 1  # the prompt's scores came once
    final = st.final()["logprobs"]
    assert final["token_logprobs"] == [None, -2.0, -3.0, -1.0, -1.0]
    assert final["text_offset"] == sorted(final["text_offset"])


def test_score_only_drops_the_sampled_token(tiny_llama):
    tok = Tokenizer.from_dir(tiny_llama)
    st = ChoiceState(0, "completion", tok, True, echo=Echo("abc", [5, 6, 7], score_only=True))
    chunk = st.add(out("zz", [8], finished=True, prompt_logprobs=PROMPT_LPS))
    assert chunk["text"] == "abc" and chunk["finish_reason"] == "length"
    assert len(chunk["logprobs"]["tokens"]) == 3
    assert st.completion_tokens == 0 and st.final()["text"] == "abc"


# A model vocabulary larger than its tokenizer's (padded embeddings): ids past
# the tokenizer have no text.
def test_ids_the_tokenizer_lacks_are_named_by_id_and_lose_no_alternative(tiny_llama):
    tok = Tokenizer.from_dir(tiny_llama)
    past = [tok.vocab_size, tok.vocab_size + 1, tok.vocab_size + 7]
    lps = [{"token_id": past[0], "logprob": -1.0, "top": [[t, -1.0 - i] for i, t in enumerate(past)]}]
    c = completion_logprobs(tok, lps, 4)
    assert c["tokens"] == [f"token_id:{past[0]}"]
    assert c["top_logprobs"][0] == {f"token_id:{t}": -1.0 - i for i, t in enumerate(past)}
    assert c["text_offset"] == [4]
    ch = chat_logprobs(tok, lps)["content"][0]
    assert (ch["token"], ch["bytes"]) == (f"token_id:{past[0]}", None)
    assert [t["token"] for t in ch["top_logprobs"]] == [f"token_id:{t}" for t in past]


def test_text_offsets_follow_the_text_not_the_placeholders(tiny_llama):
    tok = Tokenizer.from_dir(tiny_llama)
    (a,), (b,) = tok.encode("a", add_special_tokens=False), tok.encode("b", add_special_tokens=False)
    st = ChoiceState(0, "completion", tok, True)
    lps = [{"token_id": t, "logprob": -1.0, "top": []} for t in (a, tok.vocab_size, b)]
    st.add(out(tok.decode([a, b]), [a, tok.vocab_size, b], finished=True, logprobs=lps))
    final = st.final()
    width = len(tok.decode([a]))
    assert final["logprobs"]["text_offset"] == [0, width, width]
    assert final["text"] == tok.decode([a, b])


def test_alternatives_with_the_same_text_keep_their_own_keys(tiny_llama):
    tok = Tokenizer.from_dir(tiny_llama)
    # byte tokens that are not whole UTF-8 characters all decode to U+FFFD
    fragments = [i for i in range(tok.vocab_size)
                 if tok.decode([i], skip_special_tokens=False) == "\ufffd"][:3]
    assert len(fragments) == 3
    lps = [{"token_id": fragments[0], "logprob": -1.0,
            "top": [[t, -1.0 - i] for i, t in enumerate(fragments)]}]
    top = completion_logprobs(tok, lps, 0)["top_logprobs"][0]
    assert top == {"\ufffd": -1.0, f"token_id:{fragments[1]}": -2.0, f"token_id:{fragments[2]}": -3.0}


def test_detokenize_renders_ids_past_the_tokenizer_as_generated_text_does(tiny_llama):
    tok = Tokenizer.from_dir(tiny_llama)
    v = tok.vocab_size
    ids = tok.encode("hello there", add_special_tokens=False)
    padded = [ids[0], v, *ids[1:], v + 7]  # a model vocabulary of v + 8 (padded embeddings)
    # no text for them, as in a completion's text (token_text)
    assert detokenize_text(tok, padded, v + 8) == "hello there"
    assert [token_text(tok, t) for t in (v, v + 7)] == ["", ""]
    for model_vocab in (v + 7, 0):  # past the model's vocabulary: refused, naming the entry
        with pytest.raises(InvalidRequestError) as e:
            detokenize_text(tok, padded, model_vocab)
        assert e.value.param == (f"tokens[{len(padded) - 1}]" if model_vocab else "tokens[1]")
