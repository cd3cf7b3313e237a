"""A deterministic bound on what a client's regular expressions cost the
structured-output matcher (``splitserve.engine.structured``).

llguidance's lexer builds states by taking derivatives of each regex; a
bounded repetition is unrolled, so ``(a{1000}){1000}`` stands for a
million positions: it takes most of a second to compile and a tenth of a
second or more per token mask on the engine thread, delaying every other
sequence of the batch. llguidance's fuel limits do not stop it in time,
and a time-based refusal would answer the same request differently on
different machines, so such regexes are refused by their shape instead.

``expanded_size`` is the number of characters a regex spells once its
bounded repetitions are unrolled: each repetition multiplies its body's
size by its largest count (its smallest when unbounded: ``*``, ``+`` and
``{m,}`` loop instead of unrolling), nested ones multiply, alternatives and
sequences add. Character classes, ``.`` and escapes count one, anchors
nothing. The scan
reads the syntax all common dialects share (Python, ECMAScript as in JSON
schema ``pattern``, Rust's as in Lark terminals); it never fails: what it
does not recognise counts as plain characters.

``spec_regexes`` finds the regexes of a constraint: the ``regex`` itself,
a JSON schema's ``pattern`` and ``patternProperties`` keys (a pattern
inside an array's ``items`` counted ``maxItems`` times, else ``minItems``
times, as llguidance unrolls arrays too), a Lark grammar's ``/regex/``
terminals (counted as often as the grammar's largest repetition count).
"""

from __future__ import annotations

import re
from typing import Any, Iterator

# largest expanded size accepted: a{10000} costs about 3 ms per token mask
# (4k vocabulary), (a{1000}){1000} about 700 ms and an error
MAX_REGEX_EXPANSION = 10_000

_COUNT = re.compile(r"\{(\d+)(,(\d*))?\}")
_BIG = 10**9  # counts past this are treated as this (no huge int parsing)
# a Lark grammar's string literals, comments and regex literals, in the order they start
_LARK_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|//[^\n]*|/((?:[^/\\\n]|\\.)+)/')
# a Lark grammar's repetition counts, outside its literals: x{3}, x{2,5}, x ~ 3, x ~ 2..5
_LARK_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}|~\s*(\d+)(?:\s*\.\.\s*(\d+))?")


def _count(digits: str) -> int:
    return _BIG if len(digits) > 9 else int(digits)


def _skip_group_prefix(text: str, i: int) -> int:
    """The index after a group's ``?:``, ``?<name>``, ``?P<name>``,
    ``?=``, ``?!``, ``?<=``, ``?<!`` (``i``: just after the ``(``)."""
    if i >= len(text) or text[i] != "?":
        return i
    i += 1
    if i < len(text) and text[i] == "P":
        i += 1
    if i < len(text) and text[i] == "<" and i + 1 < len(text) and text[i + 1] not in "=!":
        end = text.find(">", i)
        return len(text) if end < 0 else end + 1
    if i < len(text) and text[i] == "<":
        i += 1
    if i < len(text) and text[i] in ":=!":
        i += 1
    return i


def expanded_size(regex: str) -> int:
    """Characters ``regex`` spells with its bounded repetitions unrolled
    (see the module docstring); at most about ``_BIG`` squared per level."""
    # per open group: [size of the alternatives closed so far, current branch, last atom]
    stack: list[list[int]] = [[0, 0, 0]]
    i, n = 0, len(regex)
    while i < n:
        c = regex[i]
        frame = stack[-1]
        if c == "\\":
            i += 2
            if i - 1 < n and regex[i - 1] in "pPxuk" and i < n and regex[i] in "{<":
                close = regex.find("}" if regex[i] == "{" else ">", i)
                i = n if close < 0 else close + 1
            frame[1] += 1
            frame[2] = 1
            continue
        if c == "[":
            j = i + 1
            if j < n and regex[j] == "^":
                j += 1
            if j < n and regex[j] == "]":
                j += 1
            while j < n and regex[j] != "]":
                j += 2 if regex[j] == "\\" else 1
            i = j + 1
            frame[1] += 1
            frame[2] = 1
            continue
        if c == "(":
            stack.append([0, 0, 0])
            i = _skip_group_prefix(regex, i + 1)
            continue
        if c == ")" and len(stack) > 1:
            done = stack.pop()
            size = done[0] + done[1]
            stack[-1][1] += size
            stack[-1][2] = size
            i += 1
            continue
        if c == "|":
            frame[0] += frame[1]
            frame[1] = frame[2] = 0
            i += 1
            continue
        if c == "{":
            m = _COUNT.match(regex, i)
            if m is not None:
                low = _count(m.group(1))
                high = low if m.group(2) is None else (_count(m.group(3)) if m.group(3) else low)
                count = max(low, high)
                frame[1] += frame[2] * (count - 1) if count else -frame[2]
                frame[2] *= count
                i = m.end()
                continue
        if c in "*+?^$":  # quantifiers without a count; anchors spell nothing
            i += 1
            continue
        frame[1] += 1
        frame[2] = 1
        i += 1
    while len(stack) > 1:  # unclosed groups: llguidance refuses the regex anyway
        done = stack.pop()
        stack[-1][1] += done[0] + done[1]
    return stack[0][0] + stack[0][1]


def lark_regexes(grammar: str) -> Iterator[tuple[str, int]]:
    """(regex, times) for the ``/regex/`` terminals of a Lark grammar;
    ``times``: the grammar's largest repetition count (``x{m,n}``,
    ``x ~ m..n``) outside its literals, since a rule repeated that often may
    hold the terminal (an over-estimate: rules are not followed)."""
    outside = _LARK_TOKEN.sub(" ", grammar)
    counts = [_count(d) for m in _LARK_REPEAT.finditer(outside) for d in m.groups() if d]
    times = max([1, *counts])
    for m in _LARK_TOKEN.finditer(grammar):
        if m.group(1) is not None:
            yield m.group(1), times


_NOT_SCHEMAS = frozenset({"enum", "const", "default", "examples", "description", "title"})
_NAMED = frozenset({"properties", "patternProperties", "$defs", "definitions",
                    "dependentSchemas"})
_ARRAY_PARTS = frozenset({"items", "prefixItems", "additionalItems", "contains"})


def schema_regexes(schema: Any) -> Iterator[tuple[str, int]]:
    """(pattern, how many times it is unrolled) for each regex of a JSON
    schema; ``schema``'s nesting is already bounded (``MAX_JSON_DEPTH``)."""
    # (node, times, whether node maps names to schemas: its keys are not keywords)
    todo: list[tuple[Any, int, bool]] = [(schema, 1, False)]
    while todo:
        node, times, named = todo.pop()
        if isinstance(node, list):
            todo.extend((v, times, False) for v in node)
            continue
        if not isinstance(node, dict):
            continue
        if named:
            todo.extend((v, times, False) for v in node.values())
            continue
        if isinstance(node.get("pattern"), str):
            yield node["pattern"], times
        if isinstance(node.get("patternProperties"), dict):
            yield from ((p, times) for p in node["patternProperties"])
        counts = [v for v in (node.get("minItems"), node.get("maxItems"))
                  if isinstance(v, int) and not isinstance(v, bool)]
        items = max([1, *counts])
        for key, value in node.items():
            if key not in _NOT_SCHEMAS and isinstance(value, (dict, list)):
                todo.append((value, times * items if key in _ARRAY_PARTS else times,
                             key in _NAMED))


def oversized_regex(kind: str, value: str, schema: Any = None) -> str:
    """Why the constraint's regexes are refused (see the module docstring),
    or "" when none expands past ``MAX_REGEX_EXPANSION``. ``schema``: the
    parsed JSON schema when ``kind`` is json."""
    if kind == "regex":
        found: Iterator[tuple[str, int]] = iter([(value, 1)])
    elif kind == "grammar":
        found = lark_regexes(value)
    else:
        found = schema_regexes(schema)
    for regex, times in found:
        size = expanded_size(regex) * times
        if size > MAX_REGEX_EXPANSION:
            where = ""
            if times > 1:
                where = (f" (inside an array of {times} items)" if kind == "json"
                         else f" (in a grammar that repeats a rule {times} times)")
            return (f"the regex {regex[:80]!r}{where} spells {size} characters once its bounded "
                    f"repetitions are unrolled; at most {MAX_REGEX_EXPANSION} (nested counts "
                    "multiply: use fewer, or * / + for an unbounded one)")
    return ""
