"""Strict JSON parsing shared by both APIs, the HTTP body
(splitserve.cluster.api.http_body) and the gRPC API's fields that carry a
JSON value as text (splitserve.cluster.api.grpc_messages), and by the
engine's JSON-schema constraints (splitserve.engine.structured). All refuse what
json.loads would let through: NaN and Infinity, written out or as a number
too large for a float (1e999) — not JSON, and no value a schema, a template
or a sampling field can use — and an object that repeats a key (the last
value would win here, while a proxy in front may read the first)."""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import MAX_JSON_DEPTH, nesting_exceeds


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


class OutOfRange(ValueError):
    """A number too large for a float (it would parse as Infinity)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999 parses as Infinity
        raise OutOfRange(f"the number {text[:40]} is out of range")
    return value


class Repeated(dict):
    """A JSON object that repeats a key (``key``, the first one repeated)."""

    key = ""


def _object_hook(found: list[str]):
    """json's object_pairs_hook: an object that repeats a key becomes a
    ``Repeated`` and the key goes into ``found``, not silently resolved."""

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        seen: set[str] = set()
        repeated = Repeated(obj)
        repeated.key = next(k for k, _ in pairs if k in seen or seen.add(k))
        found.append(repeated.key)
        return repeated

    return hook


def find_node(value: Any, match: Callable[[Any], bool],
              max_depth: int = MAX_JSON_DEPTH) -> Any | None:
    """The first node of ``value`` (parsed JSON) that ``match`` holds for,
    depth first, an object or array before what it holds and in order;
    None when none does. ``value`` is at depth 0; nodes deeper than
    ``max_depth`` are not looked at (every node of a value that passes
    ``nesting_exceeds(value, max_depth)`` is). Iterative: safe on any depth."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if match(node):
            return node
        if depth < max_depth and isinstance(node, (dict, list)):
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in reversed(children))
    return None


def loads(text: str) -> tuple[Any, bool]:
    """The JSON value of ``text`` and whether an object in it repeats a key
    (then that object is a ``Repeated``; callers name the field with
    ``repeated_key`` after bounding the nesting, since the search looks
    no deeper than MAX_JSON_DEPTH). Raises ValueError (NaN, Infinity, not
    JSON) or RecursionError."""
    found: list[str] = []
    value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                       object_pairs_hook=_object_hook(found))
    return value, bool(found)


def repeated_key(data: dict) -> str | None:
    """The field to name for a repeated key: the key itself at the top
    level, else the top-level field that holds the object repeating it."""
    if isinstance(data, Repeated):
        return data.key
    return next((key for key, value in data.items() if _first_repeated(value) is not None), None)


def _first_repeated(value: Any) -> str | None:
    """The key repeated by the first object in ``value`` that repeats one."""
    found = find_node(value, lambda node: isinstance(node, Repeated))
    return None if found is None else found.key


def parse_field(text: str, param: str) -> Any:
    """A field holding JSON as text, parsed as strictly as the HTTP body:
    an InvalidRequestError naming ``param`` for text that is not JSON
    (NaN and Infinity included), nests deeper than MAX_JSON_DEPTH, or
    repeats a key in an object."""
    too_deep = InvalidRequestError(f"{param} nests more than {MAX_JSON_DEPTH} levels deep",
                                   param=param)
    try:
        value, repeated = loads(text)
    except ValueError as e:
        raise InvalidRequestError(f"{param} is not valid JSON: {e}", param=param) from None
    except RecursionError:
        raise too_deep from None
    if nesting_exceeds(value, MAX_JSON_DEPTH):
        raise too_deep
    if repeated:
        key = _first_repeated(value)
        raise InvalidRequestError(f"{param} repeats the key {key[:100]!r} in an object: each key may "
                                  "appear once", param=param)
    return value
