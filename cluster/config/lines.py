"""Where a key path sits in the operator's YAML file.

Validation reports a key path (``models.0.decode.max_replicas``); an
operator editing a long file also wants the line. ``read_yaml`` keeps the
composed node tree next to the data it builds, and ``locate`` walks that
tree along a validation error's path to the deepest key that exists: the
key itself when it was written, its parent mapping when it is missing.
"""

from __future__ import annotations

import yaml


def read_yaml(text: str) -> tuple[object, yaml.Node | None]:
    """(the data ``yaml.safe_load`` gives, the node tree it was built from);
    parsed once, so the lines are those of the data. YAMLError as safe_load,
    and ``RepeatedKey`` for a key written twice in one mapping."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            check_unique_keys(node)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


class RepeatedKey(yaml.MarkedYAMLError):
    """A mapping that names one key twice: YAML keeps the last silently, so
    an edit appended below an old value (or a pasted section) would win or
    lose unseen."""


def check_unique_keys(root: yaml.Node) -> None:
    """Raise RepeatedKey at the second of two equal keys of one mapping.
    A merge (``<<: *defaults``) may bring a key the mapping also writes:
    that is what merges are for. Each node is visited once, so aliases of
    aliases (a "billion laughs" file) cost their size, not their expansion."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, yaml.Mark] = {}
            for key, value in node.value:
                stack.append(value)
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    stack.append(key)
                    continue
                if key.value in first:
                    raise RepeatedKey(
                        problem=f"{key.value!r} appears twice (lines "
                                f"{first[key.value].line + 1} and {key.start_mark.line + 1}); "
                                "YAML would keep the second silently: keep one",
                        problem_mark=key.start_mark)
                first[key.value] = key.start_mark
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def locate(root: yaml.Node | None, loc: tuple) -> str | None:
    """``line N, column C`` (1-based) of the deepest part of ``loc`` present
    under ``root``, or None when not even the first part is (a top-level
    problem has no better line than the file's first)."""
    mark = None
    node = root
    for part in loc:
        found = _child(node, part)
        if found is None:
            break  # a missing key, or a validator's tag: the parent is the place
        mark, node = found
    if mark is None:
        return None
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _child(node: yaml.Node | None, part) -> tuple[yaml.Mark, yaml.Node] | None:
    """(where ``part`` is written, its value node) below ``node``, or None."""
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        if 0 <= part < len(node.value):
            item = node.value[part]
            return item.start_mark, item
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    merged: list[yaml.Node] = []
    # The last of repeated keys wins, as in the data safe_load builds.
    for key, value in reversed(node.value):
        if not isinstance(key, yaml.ScalarNode):
            continue
        if key.tag == "tag:yaml.org,2002:merge":
            merged.extend(value.value if isinstance(value, yaml.SequenceNode) else [value])
        elif key.value == str(part):
            return key.start_mark, value
    for source in merged:  # ``<<: *defaults``: keys written elsewhere
        found = _child(source, part)
        if found is not None:
            return found
    return None
