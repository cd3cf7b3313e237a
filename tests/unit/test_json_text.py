"""engine/json_text.py's tree walker (find_node), which both the repeated-key
search here and the HTTP body's out-of-range search use, and those two
searches on real parsed text."""

import math

import pytest

from splitserve.cluster.api.http_body import _out_of_range_field
from splitserve.engine import json_text
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import MAX_JSON_DEPTH, nesting_exceeds


def _nest(leaf, levels: int):
    for i in range(levels):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


def test_the_first_match_in_document_order_with_a_container_before_its_contents():
    value = {"a": [1, {"b": 2}], "c": {"d": 3}, "e": 4}
    ints = []
    assert json_text.find_node(value, lambda n: isinstance(n, int) and not ints.append(n)
                               and n >= 2) == 2
    assert ints == [1, 2]  # stopped at the first match
    assert json_text.find_node(value, lambda n: isinstance(n, dict) and "d" in n) == {"d": 3}
    outer = {"x": {"x": 1}}
    assert json_text.find_node(outer, lambda n: isinstance(n, dict) and "x" in n) is outer
    assert json_text.find_node(value, lambda n: n == 5) is None
    assert json_text.find_node(7, lambda n: n == 7) == 7  # a scalar is its own root


def test_nodes_past_max_depth_are_not_looked_at():
    for depth in (0, 1, 5):
        value = _nest(math.inf, depth)
        for bound in range(depth + 2):
            found = json_text.find_node(value, lambda n: n == math.inf, max_depth=bound)
            assert (found is not None) == (depth <= bound), (depth, bound)


def test_every_node_of_a_value_within_the_nesting_bound_is_seen():
    # MAX_JSON_DEPTH containers deep: the deepest scalar is at depth MAX_JSON_DEPTH
    value = _nest("leaf", MAX_JSON_DEPTH)
    assert not nesting_exceeds(value, MAX_JSON_DEPTH)
    assert json_text.find_node(value, lambda n: n == "leaf") == "leaf"
    assert nesting_exceeds(_nest("leaf", MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH)
    assert json_text.find_node(_nest("leaf", MAX_JSON_DEPTH + 1), lambda n: n == "leaf") is None


def test_a_very_deep_value_does_not_recurse():
    value = _nest("leaf", 50_000)
    assert json_text.find_node(value, lambda n: n == "leaf", max_depth=10**6) == "leaf"


def test_the_searches_that_use_it_name_the_right_field():
    text = '{"a": [1, {"p": 1, "p": 2}], "b": {"q": {"r": 1, "r": 2}}}'
    data, repeated = json_text.loads(text)
    assert repeated and json_text.repeated_key(data) == "a"
    with pytest.raises(InvalidRequestError, match="repeats the key 'p'"):
        json_text.parse_field(text, "schema")
    assert _out_of_range_field('{"a": [1, 2], "b": {"c": [3, 1e999]}}') == "b"
    assert _out_of_range_field('{"a": 1e308}') is None
    deep = '{"a": ' + "[" * (MAX_JSON_DEPTH + 1) + "1e999" + "]" * (MAX_JSON_DEPTH + 1) + "}"
    assert _out_of_range_field(deep) is None  # past the bound: not searched
