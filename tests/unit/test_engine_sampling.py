"""Sampling through the whole engine: seeds, stop strings, stop ids, limits."""

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def eng(tiny_llama):
    return LLMEngine(EngineConfig(model=str(tiny_llama), num_blocks=256, block_size=4))


def test_seeded_requests_reproduce_regardless_of_batch(eng):
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = eng.generate([[5, 6, 7, 8]], sp)[0].token_ids
    others = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    batched = eng.generate([[9, 9, 9], [5, 6, 7, 8], [1, 2]], [others, sp, others])[1].token_ids
    assert alone == batched
    other_seed = eng.generate([[5, 6, 7, 8]], SamplingParams(
        max_tokens=12, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))[0].token_ids
    assert other_seed != alone
    assert eng.kv.all_free()


def test_stop_string_cuts_text_exactly(eng):
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    full = eng.generate([[3, 4, 5]], greedy)[0]
    text = full.text
    # pick a stop string from the middle of the greedy text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip()
                and "\ufffd" not in text[i:i + 2])
    cut = text.index(stop)
    res = eng.generate([[3, 4, 5]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                    stop=[stop]))[0]
    assert res.text == text[:cut] and res.finish_reason == "stop"
    inc = eng.generate([[3, 4, 5]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                    stop=[stop], include_stop_str_in_output=True))[0]
    assert inc.text == text[:cut + len(stop)]
    assert res.token_ids == full.token_ids[:len(res.token_ids)]


def test_stop_token_id_and_max_tokens(eng):
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    full = eng.generate([[11, 12]], greedy)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    stop_id = full.token_ids[4]
    k = full.token_ids.index(stop_id)
    res = eng.generate([[11, 12]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                   stop_token_ids=[stop_id]))[0]
    assert res.token_ids == full.token_ids[:k + 1] and res.finish_reason == "stop"


def test_context_limits_are_invalid_requests(eng):
    n = eng.max_model_len
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request(None, prompt_token_ids=[1] * n)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request(None, prompt_token_ids=[1] * 10, params=SamplingParams(max_tokens=n))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request(None, prompt_token_ids=[])
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request(None, prompt_token_ids=[eng.model_cfg.vocab_size])
    assert e.value.param == "prompt"
    assert not eng.has_unfinished()


def stream(eng, prompt, params):
    """[(token ids, text)] of each step's output, and the finish reason."""
    rid = eng.add_request(None, prompt_token_ids=prompt, params=params)
    steps, reason = [], None
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == rid:
                steps.append((out.new_token_ids, out.new_text))
                reason = out.finish_reason if out.finished else reason
    return steps, reason


@pytest.mark.parametrize("completes", [True, False])
def test_resume_keeps_text_held_for_a_stop_string(eng, completes):
    """A replica holds back the start of a possible stop string; a request
    resumed elsewhere after those tokens must release that text, or stop
    on a stop string that straddles the resume point, exactly as the
    uninterrupted request does."""
    prompt = [3, 4, 5]
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    steps, _ = stream(eng, prompt, greedy)
    texts = [t for _, t in steps]
    k = next(i for i in range(2, len(texts) - 2)
             if texts[i - 1].strip() and texts[i].strip() and "\ufffd" not in texts[i - 1] + texts[i])
    # a stop string from the last character before the resume point into
    # the first one after it, or one that never completes
    stop = texts[k - 1][-1] + (texts[k][0] if completes else "\x00never")
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    whole, whole_reason = stream(eng, prompt, params)
    want = "".join(t for _, t in whole)
    ids = [t for s in whole for t in s[0]]
    assert ids[:k + 1] == [t for s in steps[:k + 1] for t in s[0]]
    sent_before = "".join(t for _, t in whole[:k])  # what the first replica had released
    assert sent_before == "".join(texts[:k])[:-1]  # its last character held back
    rest, reason = stream(eng, prompt + ids[:k], SamplingParams(
        max_tokens=20 - k, temperature=0.0, ignore_eos=True, stop=[stop], resumed_tokens=k))
    assert sent_before + "".join(t for _, t in rest) == want
    assert reason == whole_reason == ("stop" if completes else "length")
    assert [t for s in rest for t in s[0]] == ids[k:]
    assert eng.kv.all_free()
