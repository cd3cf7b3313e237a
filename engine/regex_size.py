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
terminals, each counted as often as the repetitions that can reach it
unroll it: the product of the largest count in each definition on the
heaviest chain of definitions referencing the one that holds it.
Measured on the default model's tokenizer (4k tokens), both kinds of Lark
repetition cost like an unrolled regex: a rule-level one (``start:
x{1000}`` with ``x: /a{1000}/``) about 0.9 s per mask, ``x{1000}`` with
``x: /a{10}/`` 80 ms; a terminal-level one (``X: /a{10}/{1000}``) the same
7 ms as ``/a{10000}/``. A repetition elsewhere in the grammar costs the
regex nothing (an identifier terminal beside an unrelated ``item{1,200}``
rule: under 0.2 ms per mask), so it is not counted.
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


# a Lark definition's head, at the start of a line: rule or terminal name, with Lark's
# ?/! prefix, a priority (name.2), template parameters or llguidance's [attributes]
_LARK_HEAD = re.compile(r"[ \t]*[?!]?([A-Za-z_]\w*)[ \t]*(?:\.[ \t]*-?\d+)?[ \t]*"
                        r"(?:\{[^}\n]*\}[ \t]*)?(?:\[[^\]\n]*\][ \t]*)?:")
_LARK_NAME = re.compile(r"[A-Za-z_]\w*")


def _lark_definitions(grammar: str) -> tuple[list[str], list[str], list[int]]:
    """The grammar split into definitions: (names, bodies, the definition of
    each line). Literals, comments and regexes are blanked out of the bodies
    (same length: offsets keep their line); a line that starts no
    definition continues the one above (``|`` alternatives), a ``%``
    directive is a definition of its own, text before the first definition
    one named ""."""
    blank = _LARK_TOKEN.sub(lambda m: " " * len(m.group(0)), grammar)
    names: list[str] = [""]
    bodies: list[list[str]] = [[]]
    index = {"": 0}
    of_line: list[int] = []
    current = 0
    for line in blank.split("\n"):
        head = _LARK_HEAD.match(line)
        if line.lstrip().startswith("%"):
            current = len(names)
            names.append("%")
            bodies.append([line.lstrip()[1:]])
        elif head is not None:
            name = head.group(1)
            if name not in index:  # %override / a repeated name: one definition
                index[name] = len(names)
                names.append(name)
                bodies.append([])
            current = index[name]
            bodies[current].append(line[head.end():])
        else:
            bodies[current].append(line)
        of_line.append(current)
    return names, ["\n".join(b) for b in bodies], of_line


def _sccs(edges: list[list[int]]) -> list[list[int]]:
    """Strongly connected components of a graph (Tarjan's, iterative: a
    grammar may chain thousands of definitions), each listed after every
    component its edges lead to."""
    n = len(edges)
    order, low, on_stack = [-1] * n, [0] * n, [False] * n
    stack: list[int] = []
    out: list[list[int]] = []
    counter = 0
    for root in range(n):
        if order[root] >= 0:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                order[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if i < len(edges[v]):
                w = edges[v][i]
                work.append((v, i + 1))
                if order[w] < 0:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], order[w])
                continue
            for w in edges[v]:  # children done: fold in their lows
                if on_stack[w]:
                    low[v] = min(low[v], low[w])
            if low[v] == order[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    comp.append(w)
                    if w == v:
                        break
                out.append(comp)
    return out


def _lark_repeats(body: str) -> int:
    """The largest repetition count in a definition's body (1 if none)."""
    counts = [_count(d) for m in _LARK_REPEAT.finditer(body) for d in m.groups() if d]
    return max([1, *counts])


def lark_regexes(grammar: str) -> Iterator[tuple[str, int]]:
    """(regex, times) for the ``/regex/`` terminals of a Lark grammar;
    ``times``: how often the grammar's repetitions may unroll it, the
    product of the largest repetition count (``x{m,n}``, ``x ~ m..n``) of
    each definition on the heaviest chain of definitions that reference,
    one through the next, the one holding the regex (that one included). A
    cycle of definitions counts as one definition repeating by the product
    of its members' counts, each once."""
    names, bodies, of_line = _lark_definitions(grammar)
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if name and name != "%":
            index[name] = i
    # edges[d]: the definitions that reference d
    edges: list[list[int]] = [[] for _ in names]
    for i, body in enumerate(bodies):
        for ref in {index[w] for w in _LARK_NAME.findall(body) if w in index}:
            edges[ref].append(i)
    comps = _sccs(edges)  # referrers before the definitions they reference
    comp_of = [0] * len(names)
    for c, members in enumerate(comps):
        for v in members:
            comp_of[v] = c
    times = [1] * len(comps)
    for c, members in enumerate(comps):
        own = 1
        for v in members:
            own = min(own * _lark_repeats(bodies[v]), _BIG)
        before = [times[comp_of[r]] for v in members for r in edges[v] if comp_of[r] != c]
        times[c] = min(own * max([1, *before]), _BIG)
    line, counted = 0, 0  # the line of offset ``counted``, advanced token by token
    for m in _LARK_TOKEN.finditer(grammar):
        if m.group(1) is not None:
            line += grammar.count("\n", counted, m.start())
            counted = m.start()
            yield m.group(1), times[comp_of[of_line[line]]]


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
