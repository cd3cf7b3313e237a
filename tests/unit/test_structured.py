"""Structured outputs on the engine: constrained greedy decoding equals
transformers' greedy decoding under the same grammar mask, step by step;
sampled outputs always parse; the constraint survives batching with free
rows, preemption, a KV hand-off and a resume; bad constraints are refused
with param ``response_format``; every block is free afterwards."""

import json
import re
from pathlib import Path

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.limits import MAX_JSON_DEPTH
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.structured import MAX_SPEC_CHARS, check_spec, choice_spec, fill_masks, json_object_spec
from tests.fixtures.checkpoints import hf_model
from tests.fixtures.handoff import handoff_generate

llg = pytest.importorskip("llguidance")

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                         "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
JSON = {"type": "json", "value": json.dumps(SCHEMA)}
REGEX = {"type": "regex", "value": r"[a-f]{2,5}-[0-9]{1,3}"}
CHOICES = ["yes", "no", "maybe so"]
LARK = {"type": "grammar", "value": 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,2}/'}
PROMPTS = [[5, 9, 13, 2, 40], [7] * 3, list(range(30, 52)), [99, 3, 17, 17, 8, 1, 60]]


def make(path, **kw):
    args = dict(model=str(path), num_blocks=256, block_size=4, max_num_batched_tokens=512)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


def greedy(spec, max_tokens=48, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_output=spec, **kw)


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def engine(llama):
    return make(llama)


@torch.no_grad()
def hf_constrained_greedy(path: Path, spec, prompt, max_new, eos) -> list[int]:
    """transformers' logits, masked by a matcher made straight from the
    checkpoint's tokenizer.json, argmax, one step at a time: the reference."""
    model = hf_model(path)
    vocab = model.config.vocab_size
    tok = llg.LLTokenizer((Path(path) / "tokenizer.json").read_text(), n_vocab=vocab,
                          eos_token=list(eos))
    if spec["type"] == "json":
        grammar = llg.LLMatcher.grammar_from_json_schema(
            spec["value"], defaults={"whitespace_flexible": False, "item_separator": ", ",
                                     "key_separator": ": "})
    elif spec["type"] == "regex":
        grammar = llg.LLMatcher.grammar_from_regex(spec["value"])
    else:
        grammar = llg.LLMatcher.grammar_from_lark(spec["value"])
    m = llg.LLMatcher(tok, grammar)
    ids, out = list(prompt), []
    for _ in range(max_new):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        words = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)
        allowed = ((words[:, None] >> torch.arange(32)) & 1).flatten()[:vocab].bool()
        t = int(torch.where(allowed, logits, -torch.inf).argmax())
        out.append(t)
        ids.append(t)
        if t in eos or not m.consume_token(t) or m.is_stopped():
            break
    return out


@pytest.mark.parametrize("spec", [JSON, REGEX, choice_spec(CHOICES), LARK],
                         ids=["json", "regex", "choice", "lark"])
def test_constrained_greedy_matches_transformers(llama, engine, spec):
    want = [hf_constrained_greedy(llama, spec, p, 48, engine.eos_token_ids) for p in PROMPTS]
    # batched with unconstrained rows, which must be untouched by the masks
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    res = engine.generate(PROMPTS + PROMPTS, [greedy(spec)] * len(PROMPTS) + [free] * len(PROMPTS))
    assert [r.token_ids for r in res[:len(PROMPTS)]] == want
    plain = engine.generate(PROMPTS, free)
    assert [r.token_ids for r in res[len(PROMPTS):]] == [r.token_ids for r in plain]
    for r in res[:len(PROMPTS)]:
        assert r.finish_reason in ("stop", "length")
    assert engine.kv.all_free()


def _check_person(text):
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "tags", "ok"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 6
    assert type(obj["age"]) is int and 0 <= obj["age"] <= 120
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 2
    assert set(obj["tags"]) <= {"a", "b"} and isinstance(obj["ok"], bool)


def test_sampled_outputs_always_conform(engine):
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=s, structured_output=spec)
              for s in range(6) for spec in (JSON, REGEX, choice_spec(CHOICES))]
    res = engine.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params)
    for p, r in zip(params, res):
        assert r.finish_reason == "stop", (p.structured_output, r.text)
        kind = p.structured_output["type"]
        if kind == "json":
            _check_person(r.text)
        elif kind == "regex":
            assert re.fullmatch(REGEX["value"], r.text), r.text
        else:
            assert r.text in CHOICES
    # json_object mode: an object, whatever is in it
    res = engine.generate(PROMPTS, SamplingParams(max_tokens=200, temperature=0.7, seed=1,
                                                  structured_output=json_object_spec()))
    for r in res:
        if r.finish_reason == "stop":
            assert isinstance(json.loads(r.text), dict)
    assert engine.kv.all_free()


def test_seeded_constrained_runs_repeat(engine):
    p = SamplingParams(max_tokens=64, temperature=1.0, seed=42, structured_output=JSON)
    a = engine.generate(PROMPTS, p)
    b = engine.generate(list(reversed(PROMPTS)), p)
    assert [r.token_ids for r in a] == [r.token_ids for r in reversed(b)]


def test_max_tokens_cuts_a_constrained_output(engine):
    r = engine.generate([PROMPTS[0]], greedy(JSON, max_tokens=3))[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 3


def test_grammar_end_wins_over_min_tokens(engine):
    res = engine.generate(PROMPTS, greedy(choice_spec(["yes", "no"]), min_tokens=10))
    for r in res:
        assert r.text in ("yes", "no") and r.finish_reason == "stop"
    assert engine.kv.all_free()


def test_forced_preemption_keeps_the_constraint(llama, engine):
    specs = [JSON, REGEX, LARK, JSON]
    want = [r.token_ids for r in engine.generate(PROMPTS, [greedy(s) for s in specs])]
    small = make(llama, num_blocks=24, max_num_batched_tokens=64)
    got = [r.token_ids for r in small.generate(PROMPTS, [greedy(s) for s in specs])]
    assert small.scheduler.num_preemptions > 0
    assert got == want
    assert small.kv.all_free()


def test_handoff_continues_the_constraint(llama, engine):
    params = [greedy(JSON), SamplingParams(max_tokens=64, temperature=0.9, seed=7,
                                           structured_output=JSON), greedy(LARK)]
    want = [r.token_ids for r in engine.generate(PROMPTS[:3], params)]
    src, dst = make(llama), make(llama)
    assert handoff_generate(src, dst, PROMPTS[:3], params) == want
    assert src.kv.all_free() and dst.kv.all_free()


def test_resume_continues_seed_penalties_and_grammar(engine):
    """A request resumed after k tokens (prompt + those k, marked as earlier
    output) produces exactly the rest of the uninterrupted stream."""
    p = SamplingParams(max_tokens=40, temperature=1.0, seed=11, frequency_penalty=0.7,
                       presence_penalty=0.3, structured_output=JSON)
    prompt = PROMPTS[2]
    full = engine.generate([prompt], p)[0].token_ids
    assert len(full) > 6
    for k in (1, 5):
        rest = SamplingParams(**{**p.__dict__, "max_tokens": p.max_tokens - k,
                                 "resumed_tokens": k})
        got = engine.generate([prompt + full[:k]], rest)[0].token_ids
        assert got == full[k:], k
    # without the mark the grammar would start over: the continuation differs
    plain = SamplingParams(**{**p.__dict__, "max_tokens": p.max_tokens - 5})
    assert engine.generate([prompt + full[:5]], plain)[0].token_ids != full[5:]
    assert engine.kv.all_free()


@pytest.mark.parametrize("spec, fragment", [
    ({"type": "xml", "value": "<a/>"}, "must be one of"),
    ({"type": "json", "value": ""}, "non-empty"),
    ({"type": "json", "value": "x" * (MAX_SPEC_CHARS + 1)}, "at most"),
    ({"type": "json", "value": "{not json"}, "not valid JSON"),
    ({"type": "json", "value": "[1, 2]"}, "must be a JSON object"),
    ({"type": "json", "value": '{"items": ' * (MAX_JSON_DEPTH) + "{}" + "}" * MAX_JSON_DEPTH},
     "nests more than"),
    ({"type": "json", "value": "[" * 30000 + "]" * 30000}, "nests more than"),  # past json's recursion
    ({"type": "json", "value": '{"type": "foo"}'}, "foo"),
    ({"type": "regex", "value": "(a|b"}, "unclosed group"),
    ({"type": "grammar", "value": "start: missing_rule"}, "missing_rule"),
    ({"type": "json"}, "structured_output must be"),
    ("json", "structured_output must be"),
])
def test_bad_constraints_are_refused(engine, spec, fragment):
    with pytest.raises(InvalidRequestError) as e:
        check_spec(spec)
    assert fragment in str(e.value) and e.value.param == "response_format"
    with pytest.raises(InvalidRequestError):
        engine.add_request(None, prompt_token_ids=PROMPTS[0],
                           params=SamplingParams(structured_output=spec))
    assert not engine.has_unfinished() and engine.kv.all_free()


@pytest.mark.parametrize("spec", [
    {"type": "json", "value": '{"$ref": "#"}'},
    {"type": "regex", "value": r"[^\s\S]"},
    {"type": "grammar", "value": "start: start"},
    {"type": "grammar", "value": "start: x | y\nx: y\ny: x"},
])
def test_constraints_no_output_satisfies_are_refused(engine, spec):
    # they compile, but their first step allows no token and no end: once an
    # empty output with finish reason "stop"
    with pytest.raises(InvalidRequestError) as e:
        check_spec(spec)
    assert "never be satisfied" in str(e.value) and e.value.param == "response_format"
    with pytest.raises(InvalidRequestError) as e:
        engine.grammar.matcher(spec)
    assert "never be satisfied" in str(e.value)
    assert not engine.has_unfinished() and engine.kv.all_free()


def test_satisfiable_constraints_pass_the_emptiness_check():
    for spec in (JSON, REGEX, LARK, json_object_spec(), {"type": "regex", "value": "a*"},
                 {"type": "grammar", "value": 'start: "a" | x\nx: x'}):
        check_spec(spec)


def _deep(kind, n):
    """A constraint n levels of rules deep: a Lark chain r0 -> r1 -> ... (each
    a "b" then the next) or a JSON schema's chain of $refs."""
    if kind == "grammar":
        rules = "\n".join(f'r{i}: "b" r{i + 1}' for i in range(n))
        return {"type": "grammar", "value": f'start: r0\n{rules}\nr{n}: "a"'}
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    return {"type": "json", "value": json.dumps({"$ref": "#/$defs/d0", "$defs": {
        **defs, f"d{n}": {"type": "string", "maxLength": 3}}}, separators=(",", ":"))}


@pytest.mark.parametrize("kind, n", [("grammar", 3800), ("json", 2000)])
def test_constraints_as_deep_as_the_size_limit_allows_compile(engine, kind, n):
    # llguidance compiles recursively over rules: ~2,700 levels overflowed an
    # 8 MiB thread stack, a segmentation fault of the ingress or the engine
    spec = _deep(kind, n)
    assert len(spec["value"]) <= MAX_SPEC_CHARS
    check_spec(spec)  # from this (main) thread, as from any other
    out = engine.generate([PROMPTS[0]], greedy(spec, max_tokens=4))[0]
    assert out.finish_reason in ("stop", "length")
    assert re.fullmatch("b*a?" if kind == "grammar" else r'"[^"]{0,3}"?', out.text), out.text
    assert engine.kv.all_free()


def test_a_dead_end_mid_output_finishes_with_error_not_stop(engine):
    # "a" is allowed first; after it the rule x can never be completed
    spec = {"type": "grammar", "value": 'start: "a" x\nx: x'}
    check_spec(spec)
    for r in engine.generate(PROMPTS[:2], greedy(spec, max_tokens=8)):
        assert r.finish_reason == "error" and r.text == "a", r
    assert engine.kv.all_free()


@pytest.mark.parametrize("choices", [[], ["a", ""], ["a", 3], "ab", ["x"] * 257])
def test_bad_choices_are_refused(choices):
    with pytest.raises(InvalidRequestError):
        choice_spec(choices)


def test_choice_strings_with_escapes_match_exactly(engine):
    odd = ['say "hi"', "back\\slash", "a.b*c", "ünï"]
    res = engine.generate(PROMPTS, [SamplingParams(max_tokens=32, temperature=1.0, seed=s,
                                                   structured_output=choice_spec(odd))
                                    for s in range(len(PROMPTS))])
    for r in res:
        assert r.text in odd and r.finish_reason == "stop"


def test_params_round_trip_with_a_constraint():
    p = SamplingParams(structured_output=JSON, resumed_tokens=3)
    assert SamplingParams.from_dict(p.to_dict()) == p
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(resumed_tokens=-1).validate()
    assert e.value.param == "resumed_tokens"


def test_min_tokens_counts_only_new_tokens_after_a_resume(engine):
    eos = engine.eos_token_ids[0]
    # EOS wins whenever it is allowed: the output is min_tokens tokens, then EOS
    p = SamplingParams(max_tokens=20, temperature=0.0, min_tokens=4, logit_bias={eos: 100.0},
                       resumed_tokens=6)
    r = engine.generate([PROMPTS[2]], p)[0]
    assert len(r.token_ids) == 5 and r.token_ids[-1] == eos and r.finish_reason == "stop"


def test_tokenizer_view_is_built_when_the_engine_starts(llama):
    # the first constrained request must not pay for it inside a batch step
    assert make(llama).grammar._ll_tokenizer is not None


def test_parallel_masks_equal_one_at_a_time(engine):
    """Several matchers' masks are computed on llguidance's threads in one
    call: each row equals that matcher's own mask."""
    matchers = [engine.grammar.matcher(s) for s in (JSON, REGEX, LARK, choice_spec(CHOICES), REGEX)]
    for k, m in enumerate(matchers):  # advance each to a different point
        for _ in range(k):
            row = torch.zeros(m.words, dtype=torch.int32)
            m.fill_mask(row)
            allowed = [t for t in range(m.words * 32) if (int(row[t // 32]) >> (t % 32)) & 1]
            assert m.consume(allowed[len(allowed) // 2])
    one_by_one = torch.zeros(len(matchers), matchers[0].words, dtype=torch.int32)
    for j, m in enumerate(matchers):
        m.fill_mask(one_by_one[j])
    together = torch.full_like(one_by_one, 7)
    fill_masks(matchers, together)
    assert torch.equal(together, one_by_one)
    assert len({tuple(r.tolist()) for r in together}) > 1  # the rows really differ
