"""The shape bound on constraint regexes (splitserve.engine.regex_size):
nested bounded repetitions multiply, and a constraint whose regexes unroll
past the bound is refused by check_spec naming the limit, in a regex, a
JSON schema ``pattern`` (arrays multiply it) and a Lark terminal, while
everyday patterns pass."""

import json

import pytest

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.regex_size import (MAX_REGEX_EXPANSION, expanded_size, lark_regexes,
                                          oversized_regex, schema_regexes)
from splitserve.engine.structured import check_spec

pytest.importorskip("llguidance")


@pytest.mark.parametrize("regex,size", [
    ("abc", 3), ("a{5}", 5), ("a{2,7}", 7), ("a{3,}", 3), ("a*b+c?", 3), ("(ab){3}", 6),
    ("(a{1000}){1000}", 10**6), ("((a{10}){10}){10}", 1000), ("(ab|cde){2}", 10),
    (r"\d{4}-\d{2}-\d{2}", 10), ("[a-z]{1,64}", 64), ("[{}()|]{3}", 3), (r"\({3}", 3),
    ("(?:x){4}", 4), ("(?P<n>x){4}", 4), ("(?<n>x){4}", 4), ("(?<=a)b{2}", 3), ("a{0}", 0),
    ("a{x}", 4), ("a{" + "9" * 5000 + "}", 10**9), ("(a{3}", 3), ("a)b", 3), (r"\p{L}{5}", 5), ("^a{3}$", 3),
])
def test_expanded_size(regex, size):
    assert expanded_size(regex) == size


EVERYDAY = [
    r"\d{4}-\d{2}-\d{2}", "[a-z]{1,64}", r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    r"[a-zA-Z0-9._%+-]{1,64}@[a-zA-Z0-9.-]{1,253}\.[a-zA-Z]{2,24}", ".{1,4096}", r"^\+?[1-9]\d{1,14}$",
    "(ab|cd){1000}", "[a-z]{10000}",
]


@pytest.mark.parametrize("regex", EVERYDAY)
def test_everyday_regexes_pass(regex):
    check_spec({"type": "regex", "value": regex})
    check_spec({"type": "json", "value": json.dumps({"type": "string", "pattern": regex})})


def test_a_schema_with_everyday_formats_and_a_large_enum_passes():
    schema = {"type": "object", "properties": {
        "d": {"type": "string", "format": "date"}, "e": {"type": "string", "format": "email"},
        "u": {"type": "string", "format": "uuid"}, "text": {"type": "string", "maxLength": 65535},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,20}$"},
                 "maxItems": 100},
        "kind": {"enum": [f"item-{i:04d}" for i in range(1000)]},
        # data, not schemas: a string that looks like a costly pattern is not one
        "note": {"type": "string", "default": "(a{1000}){1000}",
                 "examples": [{"pattern": "(a{1000}){1000}"}]}},
        "required": ["d", "e", "u"]}
    check_spec({"type": "json", "value": json.dumps(schema)})


@pytest.mark.parametrize("spec,says", [
    ({"type": "regex", "value": "(a{1000}){1000}"}, "spells 1000000 characters"),
    ({"type": "regex", "value": "a{100000}"}, "spells 100000 characters"),
    ({"type": "json", "value": json.dumps({"type": "string", "pattern": "^(a{1000}){1000}$"})},
     "spells 1000000 characters"),
    ({"type": "json", "value": json.dumps({"type": "object", "patternProperties": {
        "^(k{200}){200}$": {"type": "integer"}}})}, "spells 40000 characters"),
    ({"type": "json", "value": json.dumps({"type": "array", "minItems": 1000, "items": {
        "type": "string", "pattern": "^a{1000}$"}})}, "inside an array of 1000 items"),
    ({"type": "grammar", "value": "start: /(a{1000}){1000}/"}, "spells 1000000 characters"),
    ({"type": "grammar", "value": "start: x{1000}\nx: /a{1000}/"},
     "repeats a rule 1000 times"),
    ({"type": "grammar", "value": "start: x ~ 200\nx: /[a-z]{100}/"}, "repeats a rule 200 times"),
    # through a chain of rules: 30 x 30 x 30 of x{30}
    ({"type": "grammar", "value": "start: a{30}\na: \"z\"\n  | b{30}\n?b: c\nc: /x{30}/"},
     "repeats a rule 900 times"),
    # a terminal-level repetition, and one in a cycle counted once
    ({"type": "grammar", "value": "start: X\nX: /a{10}/{2000}"}, "repeats a rule 2000 times"),
    ({"type": "grammar", "value": "start: a\na: b{50} | \"q\"\nb: a{50} /x{5}/"},
     "repeats a rule 2500 times"),
])
def test_oversized_regexes_are_refused_naming_the_limit(spec, says):
    with pytest.raises(InvalidRequestError) as e:
        check_spec(spec, param="structured_outputs")
    assert e.value.param == "structured_outputs"
    msg = str(e.value)
    assert says in msg and f"at most {MAX_REGEX_EXPANSION}" in msg, msg


def test_a_property_named_like_a_keyword_is_still_a_schema():
    for name in ("default", "enum", "examples", "pattern"):
        schema = {"type": "object", "properties": {name: {"type": "string", "pattern": "a{20000}"}},
                  "$defs": {"const": {"pattern": "b{30000}"}}}
        assert sorted(schema_regexes(schema)) == [("a{20000}", 1), ("b{30000}", 1)]


def test_lark_literals_and_comments_are_not_terminals_or_counts():
    grammar = 'start: "/a{9}/" x{3} // not /b{99999}/ nor {5000}\nx: /[0-9]{2}/ "{7000}"'
    assert list(lark_regexes(grammar)) == [("[0-9]{2}", 3)]
    assert oversized_regex("grammar", grammar) == ""


def test_schema_regexes_multiply_through_nested_arrays():
    schema = {"type": "array", "maxItems": 10, "items": {
        "type": "array", "minItems": 5, "items": {"type": "string", "pattern": "x"}}}
    assert list(schema_regexes(schema)) == [("x", 50)]


IDENT = "/[a-zA-Z_][a-zA-Z0-9_]{0,63}/"
# an identifier terminal beside an unrelated repeated rule: the repetition cannot reach it
REALISTIC = (f'start: "let " ident " = [" list "]"\nident: {IDENT}\n'
             'list: item{1,200}\n    | "none"\nitem: NUMBER ","\n'
             "%import common.NUMBER\n%ignore WS\nWS: /[ \\t]{1,4}/")


def test_a_repetition_that_cannot_reach_a_regex_is_not_counted():
    assert dict(lark_regexes(REALISTIC)) == {IDENT[1:-1]: 1, "[ \\t]{1,4}": 1}
    check_spec({"type": "grammar", "value": REALISTIC})


def test_repetitions_multiply_along_the_heaviest_chain_only():
    grammar = ("start: a{3} b{40}\na: c{5}\nb: d\nc: /x/\nd: /y/\n"
               "e: c{7}  // never used: still a referrer\n")
    # per definition, its largest count: start's 40 reaches c through a (40 x 5), not e's 7
    assert list(lark_regexes(grammar)) == [("x", 200), ("y", 40)]
    # a self-referencing rule: its own count once
    assert list(lark_regexes("start: s\ns: /z/ s{4} | /w/")) == [("z", 4), ("w", 4)]


def test_the_realistic_grammar_costs_little_per_mask():
    """Measured on the default model's tokenizer: what the bound now accepts
    costs well under a millisecond per mask (an unrolled ``a{10000}`` about
    7 ms there). Counted in this thread's CPU time, which other processes on
    a loaded host do not inflate (wall time reached 33 ms there)."""
    import time

    import llguidance as llg
    from tokenizers import Tokenizer

    from splitserve.engine.default_model import default_model_path
    from splitserve.engine.structured import _limits, grammar_text

    path = default_model_path()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ll = llg.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(with_added_tokens=True),
                         eos_token=[0])
    m = llg.LLMatcher(ll, grammar_text("grammar", REALISTIC), log_level=0, limits=_limits())
    text = "let my_list = [" + "".join(f"{i}," for i in range(60)) + "]"
    worst = 0.0
    for t in tok.encode(text, add_special_tokens=False).ids:
        start = time.thread_time()
        m.compute_bitmask()
        worst = max(worst, time.thread_time() - start)
        assert m.consume_token(t), m.get_error()
    assert worst < 0.02, worst
