"""The OpenAI HTTP API on a real uvicorn server on loopback, over real
engines (LocalBackend) of tiny checkpoints: outputs equal a second engine's
for the same request, every bad input and auth case maps to its status
and error, overload is refused with Retry-After, and a client that leaves
frees its KV blocks."""

import asyncio
import json
import re
import threading

import httpx
import openai
import pytest

from tests.fixtures.admission import AdmissionBackend
from splitserve.cluster.api.backend import Overloaded, Unavailable, UnknownModel
from splitserve.cluster.api.openai_api import api_error, build_http_app, choice_params
from splitserve.cluster.api.openai_response import MIN_LOGPROB, chat_logprobs, completion_logprobs
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.api_fixtures import (KEY, ServerThread, client, engines, local, paths,  # noqa: F401
                                            refs, wait_until)

AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 << 10
SLOW_RETRY_S = 1.5


@pytest.fixture(scope="module")
def url(local):
    # the default model is the slow one: long generations stay in flight
    backend = AdmissionBackend(local, {"slow": 1}, retry_after_s=SLOW_RETRY_S)
    server = ServerThread(build_http_app(backend, [KEY], MAX_BODY))
    yield server.url
    server.stop()


def idle(local, engines):
    return local.all_blocks_free() and not any(e.has_unfinished() for e in engines.values())


def ref_run(refs, model, prompt, params):
    return refs[model].generate([prompt], params)[0]


def token_strings(engine, ids):
    return [engine.tokenizer.decode([t], skip_special_tokens=False) for t in ids]


# -- outputs equal the engine's ------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_completion_greedy_equals_engine(client, refs, stream):
    ref = ref_run(refs, "tiny-llama", "hello world",
                  SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2))
    kw = dict(model="tiny-llama", prompt="hello world", max_tokens=8, temperature=0,
              logprobs=2, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
        lps = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        tokens, lps = r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == 8 and r.usage.total_tokens == 8 + len(ref.prompt_token_ids)
        assert all(len(t) == 2 for t in r.choices[0].logprobs.top_logprobs)
        assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "tiny-llama"
    assert text == ref.text
    assert finish == ref.finish_reason == "length"
    assert tokens == token_strings(refs["tiny-llama"], ref.token_ids)
    assert lps == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-4)


def test_completion_token_id_prompt_equals_engine(client, refs):
    prompt = [5, 17, 99, 3, 250, 42]
    ref = ref_run(refs, "tiny-qwen", prompt, SamplingParams(max_tokens=6, temperature=0.0))
    r = client.completions.create(model="tiny-qwen", prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == 6


def check_echo_logprobs(lp, ref, tokens, n_top):
    """``lp``: a completions logprobs object of an echoed prompt (and maybe
    output); ``ref``: the reference engine's CompletionResult."""
    p = len(ref.prompt_token_ids)
    assert lp.tokens[:p] == tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:p] == pytest.approx(
        [x.logprob for x in ref.prompt_logprobs[1:]], abs=1e-4)
    assert all(len(t) == n_top for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt(client, refs, stream):
    prompt = "hello world, once more"
    ref = ref_run(refs, "tiny-llama", prompt,
                  SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2))
    kw = dict(model="tiny-llama", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        assert len(chunks) == 1
        choice = chunks[0].choices[0]
    else:
        r = client.completions.create(**kw)
        choice = r.choices[0]
        assert r.usage.completion_tokens == 0
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert choice.text == prompt and choice.finish_reason == "length"
    tokens = token_strings(refs["tiny-llama"], ref.prompt_token_ids)
    assert len(choice.logprobs.tokens) == len(tokens)
    check_echo_logprobs(choice.logprobs, ref, tokens, 2)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_before_the_output(client, refs, stream):
    prompt = [5, 17, 99, 3, 250, 42]
    ref = ref_run(refs, "tiny-qwen", prompt, SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=1))
    eng = refs["tiny-qwen"]
    kw = dict(model="tiny-qwen", prompt=prompt, max_tokens=4, temperature=0, echo=True,
              logprobs=1, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        lp = chunks[0].choices[0].logprobs
        for c in chunks[1:]:
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(lp, k).extend(getattr(c.choices[0].logprobs, k))
    else:
        r = client.completions.create(**kw)
        text, lp = r.choices[0].text, r.choices[0].logprobs
        assert r.usage.completion_tokens == 4
    assert text == eng.tokenizer.decode(prompt, skip_special_tokens=False) + ref.text
    out_tokens = token_strings(eng, ref.token_ids)
    check_echo_logprobs(lp, ref, token_strings(eng, prompt), 1)
    assert lp.tokens[len(prompt):] == out_tokens
    assert lp.token_logprobs[len(prompt):] == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-4)
    # offsets run on from the prompt's token strings through the output's
    assert lp.text_offset[len(prompt)] == sum(len(t) for t in token_strings(eng, prompt))


def test_echo_without_logprobs(client, refs):
    ref = ref_run(refs, "tiny-llama", "abc", SamplingParams(max_tokens=3, temperature=0.0))
    r = client.completions.create(model="tiny-llama", prompt="abc", max_tokens=3, temperature=0,
                                  echo=True)
    assert r.choices[0].text == "abc" + ref.text and r.choices[0].logprobs is None


CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]


def chat_prompt_ids(engine):
    # list-of-parts content is joined with newlines before templating
    msgs = [CHAT[0], {"role": "user", "content": "hello\nworld"}]
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(msgs), add_special_tokens=False)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_engine(client, refs, stream):
    eng = refs["tiny-llama"]
    ref = ref_run(refs, "tiny-llama", chat_prompt_ids(eng),
                  SamplingParams(max_tokens=7, temperature=0.0, logprobs=3))
    # the official client's "developer" role is rendered as the system message it stands for
    kw = dict(model="tiny-llama", messages=[{**CHAT[0], "role": "developer"}, CHAT[1]],
              max_completion_tokens=7, temperature=0, logprobs=True, top_logprobs=3)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        finish = chunks[-1].choices[0].finish_reason
        assert chunks[-1].object == "chat.completion.chunk"
    else:
        r = client.chat.completions.create(**kw)
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
        text, finish, entries = r.choices[0].message.content, r.choices[0].finish_reason, r.choices[0].logprobs.content
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.token_ids)
    assert text == ref.text and finish == ref.finish_reason
    assert [e.token for e in entries] == token_strings(eng, ref.token_ids)
    assert [e.bytes for e in entries] == [list(t.encode()) for t in token_strings(eng, ref.token_ids)]
    assert [len(e.top_logprobs) for e in entries] == [3] * len(ref.token_ids)
    assert [e.top_logprobs[0].logprob for e in entries] == pytest.approx(
        [lp.top[0][1] for lp in ref.logprobs], abs=1e-4)


def test_every_sampling_parameter_reaches_the_engine(client, refs):
    greedy = ref_run(refs, "tiny-llama", "the cat", SamplingParams(max_tokens=12, temperature=0.0))
    stop = greedy.text[5:7] or "zz"
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, min_p=0.01, seed=11,
                            presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                            stop=[stop], stop_token_ids=[7], min_tokens=2,
                            logit_bias={greedy.token_ids[1]: -100, 13: 4})
    ref = ref_run(refs, "tiny-llama", "the cat", params)
    r = client.completions.create(
        model="tiny-llama", prompt="the cat", max_tokens=12, temperature=0.8, top_p=0.9, seed=11,
        presence_penalty=0.5, frequency_penalty=0.3, stop=stop,
        logit_bias={str(greedy.token_ids[1]): -100, "13": 4},
        extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.2, "stop_token_ids": [7],
                    "min_tokens": 2})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (ref.text, ref.finish_reason)
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_logit_bias_forces_and_bans_tokens(client, refs):
    greedy = ref_run(refs, "tiny-llama", "the cat", SamplingParams(max_tokens=6, temperature=0.0,
                                                                   ignore_eos=True))
    banned = greedy.token_ids[0]
    r = client.completions.create(model="tiny-llama", prompt="the cat", max_tokens=6, temperature=0,
                                  logit_bias={str(banned): -100}, extra_body={"ignore_eos": True})
    ref = ref_run(refs, "tiny-llama", "the cat", SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={banned: -100}))
    assert r.choices[0].text == ref.text and banned not in ref.token_ids
    forced = 42
    r = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=5, temperature=0,
                                       logit_bias={str(forced): 100}, logprobs=True)
    eng = refs["tiny-llama"]
    assert [e.token for e in r.choices[0].logprobs.content] == token_strings(eng, [forced] * 5)


PERSON = {"type": "object", "properties": {
    "answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "note": {"type": "string", "maxLength": 6}},
    "required": ["answer", "count", "note"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(client, refs, stream):
    eng = refs["tiny-llama"]
    spec = {"type": "json", "value": json.dumps(PERSON)}
    ref = ref_run(refs, "tiny-llama", chat_prompt_ids(eng),
                  SamplingParams(max_tokens=60, temperature=0.0, structured_output=spec))
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=60, temperature=0,
                                       response_format=rf, stream=stream)
    if stream:
        chunks = list(r)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert (text, finish) == (ref.text, "stop")
    obj = json.loads(text)
    assert obj["answer"] in ("yes", "no") and 0 <= obj["count"] <= 99 and len(obj["note"]) <= 6


def test_structured_outputs_with_the_official_client(client):
    # the openai client's own structured-output path: a pydantic model in,
    # a parsed instance out
    from typing import Literal

    from pydantic import BaseModel, Field

    class Verdict(BaseModel):
        answer: Literal["yes", "no"]
        confidence: int = Field(ge=0, le=10)

    for seed in range(3):
        r = client.beta.chat.completions.parse(model="tiny-llama", messages=CHAT, max_tokens=40,
                                               temperature=1.0, seed=seed, response_format=Verdict)
        v = r.choices[0].message.parsed
        assert isinstance(v, Verdict) and 0 <= v.confidence <= 10
    r = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=200, seed=1,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_vllm_structured_outputs(client, refs):
    for so, check in [({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
                      ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
                      ({"grammar": 'start: "ok" | "no"'}, lambda t: t in ("ok", "no")),
                      ({"json": PERSON}, lambda t: set(json.loads(t)) == set(PERSON["properties"]))]:
        r = client.completions.create(model="tiny-llama", prompt="pick:", max_tokens=60, temperature=0.7,
                                      seed=4, extra_body={"structured_outputs": so})
        assert check(r.choices[0].text) and r.choices[0].finish_reason == "stop", (so, r.choices[0])


def test_n_choices_are_seeded_siblings(client, refs):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=123, ignore_eos=True)
    want = [ref_run(refs, "tiny-qwen", "a b c", choice_params(params, i)).text for i in range(3)]
    r = client.completions.create(model="tiny-qwen", prompt="a b c", max_tokens=8, temperature=1.0,
                                  seed=123, n=3, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    assert want[0] == ref_run(refs, "tiny-qwen", "a b c", params).text  # choice 0 is the n=1 request
    assert r.usage.completion_tokens == 24
    chunks = list(client.completions.create(model="tiny-qwen", prompt="a b c", max_tokens=8, n=3,
                                            temperature=1.0, seed=123, stream=True,
                                            extra_body={"ignore_eos": True}))
    got = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)]
    assert got == want


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_prompts_gets_n_choices_each(client, refs, stream):
    prompts = ["a b c", "hello world", "x y"]
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    runs = [[ref_run(refs, "tiny-qwen", p, choice_params(params, i)) for i in range(2)] for p in prompts]
    want = [r.text for per_prompt in runs for r in per_prompt]  # choice k = prompt k // 2
    kw = dict(model="tiny-qwen", prompt=prompts, max_tokens=5, temperature=1.0, seed=7, n=2,
              extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                                **kw))
        got = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == k)
               for k in range(6)]
        usage = chunks[-1].usage
    else:
        r = client.completions.create(**kw)
        got = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
        usage = r.usage
    assert got == want
    assert usage.prompt_tokens == sum(len(rs[0].prompt_token_ids) for rs in runs)
    assert usage.completion_tokens == 6 * 5


def test_a_batch_of_token_prompts_scored_as_evaluation_harnesses_ask(client, refs):
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs 1,
    max_tokens 1; each choice scores its own prompt."""
    eng = refs["tiny-llama"]
    prompts = [[11, 12, 13, 14], [200, 7, 9], [42, 43, 44, 45, 46, 47]]
    r = client.completions.create(model="tiny-llama", prompt=prompts, echo=True, logprobs=1,
                                  max_tokens=1, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, p in zip(r.choices, prompts):
        ref = ref_run(refs, "tiny-llama", p, SamplingParams(max_tokens=1, temperature=0.0,
                                                            logprobs=1, prompt_logprobs=1))
        check_echo_logprobs(c.logprobs, ref, token_strings(eng, p), 1)
        assert len(c.logprobs.tokens) == len(p) + 1


def test_two_models_served_concurrently(url, refs):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        jobs = [("tiny-llama", "one two"), ("tiny-qwen", "one two"), ("tiny-llama", "three"),
                ("tiny-qwen", "three four five")]
        rs = await asyncio.gather(*[c.completions.create(model=m, prompt=p, max_tokens=10, temperature=0)
                                    for m, p in jobs])
        await c.close()
        return [r.choices[0].text for r in rs]

    got = asyncio.run(main())
    want = [ref_run(refs, m, p, SamplingParams(max_tokens=10, temperature=0.0)).text
            for m, p in [("tiny-llama", "one two"), ("tiny-qwen", "one two"), ("tiny-llama", "three"),
                         ("tiny-qwen", "three four five")]]
    assert got == want and got[0] != got[1]


def test_models_health_usage_and_timings(url, client):
    assert [(m.id, m.owned_by) for m in client.models.list()] == [
        ("tiny-llama", "splitserve"), ("tiny-qwen", "splitserve"), ("slow", "splitserve")]
    assert httpx.get(f"{url}/health", headers=AUTH).json() == {"status": "ok"}
    chunks = list(client.chat.completions.create(
        model="tiny-qwen", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    body = {"model": "tiny-qwen", "prompt": "hi", "max_tokens": 3}
    plain = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH).json()
    assert "splitserve_timings" not in plain
    timed = httpx.post(f"{url}/v1/completions", json=body, headers={**AUTH, "x-splitserve-timings": "1"})
    t = timed.json()["splitserve_timings"]
    assert 0 <= t["ingress_prepare_s"] <= t["ingress_ttft_s"] < 60
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      headers={**AUTH, "x-splitserve-timings": "1"}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert "splitserve_timings" in parsed[0] and all("splitserve_timings" not in p for p in parsed[1:])
    assert r.headers["content-type"].startswith("text/event-stream")


# -- errors --------------------------------------------------------------------

def post(url, path, body=None, content=None, headers=None):
    h = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{url}{path}", content=content if content is not None else json.dumps(body),
                      headers=h, timeout=30)


def assert_error(r, status, type_, param, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["type"], err["param"]) == (type_, param), err
    if code is not None:
        assert err["code"] == code


C, CH = "/v1/completions", "/v1/chat/completions"
OK_C = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
OK_CH = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
INVALID = "invalid_request_error"


@pytest.mark.parametrize("path,body,param", [
    (C, {**OK_C, "temperature": -0.1}, "temperature"),
    (C, {**OK_C, "temperature": "hot"}, "temperature"),
    (C, {**OK_C, "top_p": 0}, "top_p"),
    (C, {**OK_C, "top_p": 1.5}, "top_p"),
    (C, {**OK_C, "n": 17}, "n"),
    (C, {**OK_C, "stop": [f"s{i}" for i in range(17)]}, "stop"),
    (C, {**OK_C, "stop": [""]}, "stop"),
    (C, {**OK_C, "stop": 5}, "stop"),
    (C, {**OK_C, "seed": -1}, "seed"),
    (C, {**OK_C, "logprobs": 21}, "logprobs"),
    (C, {**OK_C, "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    (C, {**OK_C, "logit_bias": {"x5": 1.0}}, "logit_bias"),
    (C, {**OK_C, "logit_bias": {"5": 101}}, "logit_bias"),
    (CH, {**OK_CH, "logit_bias": {"999999": 1}}, "logit_bias"),  # past the vocabulary
    (C, {**OK_C, "frobnicate": 1}, "frobnicate"),
    (C, {"prompt": "hi"}, "model"),
    (C, {**OK_C, "prompt": ["a"] * 65}, "prompt"),
    (C, {**OK_C, "prompt": ["a"] * 20, "n": 16}, "prompt"),
    (C, {**OK_C, "prompt": ["a", ""]}, "prompt"),
    (C, {**OK_C, "prompt": [[1, 2], [3] * 5000]}, "prompt"),  # the second is too long
    (C, {**OK_C, "prompt": ""}, "prompt"),
    (C, {**OK_C, "prompt": [1, 2, 10**6]}, "prompt"),
    (C, {**OK_C, "prompt": list(range(3, 303))}, "prompt"),  # the context is 256 tokens
    (C, {**OK_C, "max_tokens": 300}, "max_tokens"),
    (C, {**OK_C, "max_tokens": 0}, "max_tokens"),
    (C, {**OK_C, "min_tokens": 5}, "min_tokens"),
    (CH, {**OK_CH, "messages": []}, "messages"),
    (CH, {**OK_CH, "messages": [{"role": "user", "content": "x " * 1000}]}, "messages"),
    (CH, {**OK_CH, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CH, {**OK_CH, "messages": [{"content": "hi"}]}, "messages[0].role"),
    (CH, {**OK_CH, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    (CH, {**OK_CH, "max_tokens": None, "max_completion_tokens": 1000}, "max_completion_tokens"),
    (CH, {**OK_CH, "top_logprobs": 2}, "top_logprobs"),
    (CH, {**OK_CH, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CH, {**OK_CH, "tools": [{"type": "function"}]}, "tools[0].function"),
    (CH, {**OK_CH, "response_format": {"type": "xml"}}, "response_format.type"),
    (CH, {**OK_CH, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    (CH, {**OK_CH, "response_format": {"type": "json_schema",
                                       "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    (CH, {**OK_CH, "response_format": {"type": "json_object", "extra": 1}}, "response_format"),
    (C, {**OK_C, "structured_outputs": {"regex": "(a"}}, "structured_outputs"),
    (C, {**OK_C, "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    (C, {**OK_C, "structured_outputs": {"choice": []}}, "structured_outputs"),
    (C, {**OK_C, "structured_outputs": {"choice": ["a"]}, "response_format": {"type": "text"}},
     "structured_outputs"),
    (CH, {**OK_CH, "chat_template_kwargs": {"messages": 1}}, "chat_template_kwargs.messages"),
])
def test_invalid_parameters_are_400_naming_the_field(url, local, engines, path, body, param):
    assert_error(post(url, path, body), 400, INVALID, param)
    assert idle(local, engines)


@pytest.mark.parametrize("content,ctype,code", [
    (b'{"model": "tiny-llama", "prompt": ', "application/json", "invalid_json"),
    (b'{"model": "tiny-llama", "prompt": "hi", "temperature": NaN}', "application/json", "invalid_json"),
    (b"[1, 2]", "application/json", "invalid_json"),
    (b'{"model": "tiny-llama", "prompt": "\xff\xfe"}', "application/json", "invalid_encoding"),
    (b"model=tiny-llama&prompt=hi", "application/x-www-form-urlencoded", "invalid_content_type"),
    (b"[" * 100000 + b"]" * 100000, "application/json", None),  # over the size limit: 413
])
def test_malformed_bodies_are_4xx_never_500(url, content, ctype, code):
    r = post(url, C, content=content, headers={"Content-Type": ctype})
    if code is None:
        assert_error(r, 413, INVALID, None, "request_too_large")
    else:
        assert_error(r, 400, INVALID, None, code)


def test_a_number_past_float_range_is_400_naming_its_field(url):
    """1e999 is Infinity in disguise: refused like NaN, naming the field."""
    r = post(url, C, content=b'{"model": "tiny-llama", "prompt": "hi", "temperature": 1e999}',
             headers={"Content-Type": "application/json"})
    assert_error(r, 400, INVALID, "temperature", "invalid_value")
    r = post(url, C, content=b'{"model": "tiny-llama", "prompt": "hi", '
             b'"logit_bias": {"5": [1, {"x": -1e999}]}}', headers={"Content-Type": "application/json"})
    assert_error(r, 400, INVALID, "logit_bias", "invalid_value")


def test_error_bodies_are_bounded(url):
    r = post(url, C, {**OK_C, "x" * 20000: 1, "stop": ["y" * 40000]})
    assert_error(r, 400, INVALID, r.json()["error"]["param"])
    assert len(r.content) < 2000


def test_deeply_nested_json_is_400(url):
    r = post(url, C, content=b'{"model": "tiny-llama", "prompt": ' + b"[" * 30000 + b"]" * 30000 + b"}")
    assert_error(r, 400, INVALID, None, "invalid_json")


def test_body_over_limit_is_413_with_or_without_content_length(url):
    big = json.dumps({**OK_C, "prompt": "a" * (MAX_BODY + 10)}).encode()
    assert_error(post(url, C, content=big), 413, INVALID, None, "request_too_large")

    def chunks():  # chunked transfer: no Content-Length, the size is counted as it arrives
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = httpx.post(f"{url}{C}", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, INVALID, None, "request_too_large")


def test_unknown_model_and_route_are_404(url, client):
    assert_error(post(url, C, {**OK_C, "model": "gpt-9"}), 404, INVALID, "model", "model_not_found")
    assert_error(post(url, CH, {**OK_CH, "model": "gpt-9"}), 404, INVALID, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi")
    assert_error(httpx.get(f"{url}/v1/nothing", headers=AUTH), 404, INVALID, None)
    assert_error(httpx.get(f"{url}{C}", headers=AUTH), 405, INVALID, None)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/health"), ("POST", C),
                                         ("POST", CH), ("GET", "/v1/nothing")])
def test_api_key_is_required_on_every_route(url, headers, method, path):
    r = httpx.request(method, f"{url}{path}", headers=headers, json=OK_C if method == "POST" else None)
    assert_error(r, 401, "authentication_error", None, "invalid_api_key")


def test_openai_client_sees_401_without_the_key(url):
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_no_keys_configured_means_open(local):
    server = ServerThread(build_http_app(local, [], MAX_BODY))
    try:
        assert httpx.get(f"{server.url}/v1/models").status_code == 200
    finally:
        server.stop()


# -- overload, disconnects --------------------------------------------------------

SLOW = {"model": "slow", "prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


def test_overload_is_429_with_retry_after_and_admitted_request_continues(url, client, local, engines):
    with httpx.stream("POST", f"{url}{C}", json={**SLOW, "stream": True}, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # admitted and generating
        refused = post(url, C, {**SLOW, "max_tokens": 2})
        assert_error(refused, 429, "rate_limit_error", None, "overloaded")
        assert refused.headers["retry-after"] == "2"  # ceil(1.5)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="slow", prompt="x", max_tokens=2)
        assert post(url, C, OK_C).status_code == 200  # other models are not limited
        got = [next(lines) for _ in range(6)]  # the admitted stream keeps going
        assert sum(x.startswith("data: {") for x in got) >= 3
    assert wait_until(lambda: idle(local, engines))
    assert post(url, C, {**SLOW, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("path,body", [(C, SLOW), (CH, {**OK_CH, "model": "slow", "max_tokens": 2000,
                                                        "ignore_eos": True})])
def test_stream_disconnect_cancels_and_frees_blocks(url, local, engines, path, body):
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, headers=AUTH) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert engines["slow"].has_unfinished() and not local.all_blocks_free()
    assert wait_until(lambda: idle(local, engines), timeout=5)


def test_disconnect_while_waiting_for_a_whole_completion_cancels_it(url, local, engines):
    def give_up_soon():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{C}", json=SLOW, headers=AUTH, timeout=httpx.Timeout(30, read=1.5))

    t = threading.Thread(target=give_up_soon)
    t.start()
    assert wait_until(lambda: engines["slow"].has_unfinished())
    t.join()
    assert wait_until(lambda: idle(local, engines), timeout=5)


def test_backend_errors_map_to_statuses():
    cases = [(InvalidRequestError("bad", "top_k"), 400, "top_k", None),
             (UnknownModel("m", ["a"]), 404, "model", None),
             (Overloaded("busy", 0.2), 429, None, "1"),
             (Unavailable("router down", 2.5), 503, None, "3")]
    for exc, status, param, retry in cases:
        e = api_error(exc)
        assert (e.status, e.param, e.headers.get("Retry-After")) == (status, param, retry)
    assert api_error(Unavailable("down")).body()["error"]["type"] == "service_unavailable"


def test_minus_infinity_logprobs_are_clamped_for_json(engines):
    tok = engines["tiny-llama"].tokenizer
    lps = [{"token_id": 40, "logprob": float("-inf"), "top": [[41, -0.5], [42, float("-inf")]]}]
    c = completion_logprobs(tok, lps, 3)
    assert c["token_logprobs"] == [MIN_LOGPROB] and c["text_offset"] == [3]
    assert sorted(c["top_logprobs"][0].values()) == [MIN_LOGPROB, -0.5]
    ch = chat_logprobs(tok, lps)["content"][0]
    assert (ch["logprob"], [t["logprob"] for t in ch["top_logprobs"]]) == (MIN_LOGPROB, [-0.5, MIN_LOGPROB])
    json.dumps(c, allow_nan=False), json.dumps(ch, allow_nan=False)
