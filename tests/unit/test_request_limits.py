"""splitserve.engine.limits: the nesting and prompt-length checks, exactly
at and one past each bound."""

import pytest

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import (MAX_JSON_DEPTH, PROMPT_CHARS_PER_TOKEN, check_prompt_chars,
                                      max_prompt_chars, nesting_exceeds)
from splitserve.engine.structured import check_spec


def nested(depth: int, kind: str):
    v = "leaf"
    for _ in range(depth):
        v = [v, 1] if kind == "list" else {"a": v, "b": 1}
    return v


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_nesting_is_counted_in_containers(kind):
    assert not nesting_exceeds(nested(MAX_JSON_DEPTH, kind))
    assert nesting_exceeds(nested(MAX_JSON_DEPTH + 1, kind))
    assert nesting_exceeds(nested(3, kind), 2) and not nesting_exceeds(nested(2, kind), 2)


def test_nesting_of_scalars_wide_values_and_mixed_containers():
    assert not nesting_exceeds("x") and not nesting_exceeds(None) and not nesting_exceeds(5)
    assert not nesting_exceeds([], 1) and nesting_exceeds([[]], 1)
    assert not nesting_exceeds({"a": list(range(100_000)), "b": {"c": [1]}}, 3)
    assert nesting_exceeds({"a": [{"b": [1]}]}, 3) and not nesting_exceeds({"a": [{"b": [1]}]}, 4)


def test_nesting_far_past_the_recursion_limit_is_found_without_recursion():
    assert nesting_exceeds(nested(100_000, "list"))


def test_a_schema_at_the_depth_limit_compiles():
    schema = '{"items": ' * (MAX_JSON_DEPTH - 1) + "{}" + "}" * (MAX_JSON_DEPTH - 1)
    check_spec({"type": "json", "value": schema})


def test_prompt_chars_are_bounded_by_the_context():
    assert max_prompt_chars(256) == 256 * PROMPT_CHARS_PER_TOKEN
    check_prompt_chars(max_prompt_chars(256), 256, "prompt")
    with pytest.raises(InvalidRequestError) as e:
        check_prompt_chars(max_prompt_chars(256) + 1, 256, "text")
    assert e.value.param == "text" and "256 tokens" in str(e.value)
