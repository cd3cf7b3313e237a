"""Reasoning output: models that think in ``<think>...</think>`` before
they answer. The chat APIs return the thinking apart from the answer
(``reasoning_content``, as vLLM does) instead of inside ``content``.

Two formats, chosen per model (``ModelSpec.reasoning_parser``):

- ``qwen3``: the model opens the block itself: ``<think>...</think>answer``.
  Output that does not open with ``<think>`` is all content.
- ``deepseek_r1``: the chat template opens the block in the prompt, so the
  output is ``...</think>answer`` (a ``<think>`` the model writes anyway is
  dropped). Output without ``</think>`` is all reasoning.
- ``auto``: ``qwen3`` when the chat template mentions ``<think>``,
  ``deepseek_r1`` when it mentions only ``</think>``, else none.

The rendered prompt comes first: one that ends in an open ``<think>`` (a
template that opened the block, e.g. Qwen3-Thinking-2507 or R1-0528)
starts the output inside the reasoning; one that ends in ``</think>``
(thinking switched off, e.g. Qwen3 with ``enable_thinking: false``) starts
it in the content. A constrained output (a structured output format) is
read from its own start, since the grammar governs it from the first token.

Reasoning runs to ``</think>`` or to the end of the output (a cut one has
no content); whitespace around the reasoning and before the content is
dropped. ``ReasoningSplitter`` does the split as text arrives, holding back
only what could still be a tag or trailing whitespace, so that any split of
an output into deltas gives the same reasoning and content as the whole.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

START, END = "<think>", "</think>"
PARSER_NAMES = ("none", "auto", "qwen3", "deepseek_r1")  # a model's reasoning_parser setting


class State(enum.Enum):
    OPEN_QWEN3 = "open_qwen3"  # waiting to see whether the output opens with <think>
    OPEN_R1 = "open_r1"  # reasoning, unless a leading <think> is still to come (dropped)
    REASONING_START = "reasoning_start"  # inside, before the first non-whitespace
    REASONING = "reasoning"
    CONTENT_START = "content_start"  # after </think>, before the first non-whitespace
    CONTENT = "content"


_THINKING = {State.OPEN_R1, State.REASONING_START, State.REASONING}


def parser_for(chat_template: str | None, name: str = "auto") -> str | None:
    """The reasoning format of a model (``name``: its reasoning_parser
    setting; auto: detected from ``chat_template``), or None."""
    if name == "none":
        return None
    if name != "auto":
        if name not in PARSER_NAMES:
            raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(PARSER_NAMES)}")
        return name
    t = chat_template or ""
    if START in t:
        return "qwen3"
    if END in t:
        return "deepseek_r1"
    return None


def start_state(parser: str, prompt_text: str, constrained: bool) -> State:
    """Where the output of ``prompt_text`` (the rendered chat) starts."""
    if not constrained:
        tail = prompt_text.rstrip()
        if tail.endswith(START):
            return State.REASONING_START
        if tail.endswith(END):
            return State.CONTENT
        if parser == "deepseek_r1":
            return State.OPEN_R1
    return State.OPEN_QWEN3


@dataclass(frozen=True)
class Reasoning:
    """A chat request's reasoning split: where its output starts, and
    whether the client wants the reasoning (vLLM's ``include_reasoning``)."""

    start: State
    include: bool = True

    def splitter(self) -> "ReasoningSplitter":
        return ReasoningSplitter(self.start)


def reasoning_for(name: str, chat_template: str | None, prompt_text: str, constrained: bool,
                  include: bool = True) -> Reasoning | None:
    """The request's reasoning split, or None when the model has no format."""
    parser = parser_for(chat_template, name)
    if parser is None:
        return None
    return Reasoning(start_state(parser, prompt_text, constrained), include)


def _partial_tag_len(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ReasoningSplitter:
    """One choice's output split into reasoning and content as it arrives.
    ``feed(text)`` returns the (reasoning, content) deltas it decides;
    ``finish()`` releases what was held when the output ends."""

    def __init__(self, start: State):
        self.state = start
        self.held = ""

    @property
    def thinking(self) -> bool:
        """Whether the output is inside the reasoning (or will be, if nothing else comes)."""
        return self.state in _THINKING

    def feed(self, text: str) -> tuple[str, str]:
        self.held += text
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning, content = [], []
        while self._step(final, reasoning, content):
            pass
        return "".join(reasoning), "".join(content)

    def _step(self, final: bool, reasoning: list[str], content: list[str]) -> bool:
        """Advance by one decision; False when it must wait for more text."""
        s = self.state
        if s in (State.OPEN_QWEN3, State.OPEN_R1):
            head = self.held.lstrip()
            if head.startswith(START):
                self.held, self.state = head[len(START):], State.REASONING_START
                return True
            if START.startswith(head) and not final:
                return False  # "", "<", "<thi", ...: may still open the block
            self.state = State.CONTENT if s is State.OPEN_QWEN3 else State.REASONING_START
            return True
        if s in (State.REASONING_START, State.CONTENT_START):
            self.held = self.held.lstrip()
            if not self.held:
                return False
            self.state = State.REASONING if s is State.REASONING_START else State.CONTENT
            return True
        if s is State.REASONING:
            end = self.held.find(END)
            if end >= 0:
                reasoning.append(self.held[:end].rstrip())
                self.held, self.state = self.held[end + len(END):], State.CONTENT_START
                return True
            if final:
                reasoning.append(self.held.rstrip())
                self.held = ""
                return False
            # hold a possible tag's beginning and trailing whitespace (dropped before </think>)
            body = self.held[:len(self.held) - _partial_tag_len(self.held, END)].rstrip()
            reasoning.append(body)
            self.held = self.held[len(body):]
            return False
        content.append(self.held)  # State.CONTENT
        self.held = ""
        return False
