"""One chat choice's output as clients see it, for every API (OpenAI chat,
Responses, gRPC): the reasoning split off first (splitserve.cluster.api.reasoning),
then what remains read for tool calls (splitserve.cluster.api.tool_calls) or
passed on as content."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from splitserve.cluster.api.reasoning import Reasoning, ReasoningSplitter
from splitserve.cluster.api.tool_calls import ToolCalls


@dataclass
class ChatDelta:
    """What one output adds: reasoning text, content text, tool call deltas
    (``tool_calls``' streaming objects), and the finish reason once known."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None

    def openai(self) -> dict[str, Any]:
        """The chat completions ``delta`` object (empty when there is nothing to send)."""
        d: dict[str, Any] = {}
        if self.reasoning:
            d["reasoning_content"] = self.reasoning
        if self.content:
            d["content"] = self.content
        if self.tool_calls:
            d["tool_calls"] = self.tool_calls
        return d


class ChatOutput:
    """Feed each text delta with ``step``; ``message()`` is the whole
    assistant message once the output has finished. ``reasoning_tokens``
    counts the outputs' tokens produced while thinking."""

    def __init__(self, reasoning: Reasoning | None = None, tool_calls: ToolCalls | None = None):
        self.splitter: ReasoningSplitter | None = reasoning.splitter() if reasoning else None
        self.include_reasoning = reasoning is None or reasoning.include
        self.tool_calls = tool_calls
        self.reasoning = ""
        self.content = ""
        self.reasoning_tokens = 0

    def step(self, text: str, num_tokens: int, finished: bool, reason: str | None) -> ChatDelta:
        reasoning = ""
        if self.splitter is not None:
            thinking = self.splitter.thinking
            reasoning, text = self.splitter.feed(text)
            if finished:
                more_reasoning, more_text = self.splitter.finish()
                reasoning, text = reasoning + more_reasoning, text + more_text
            if not text and (thinking or self.splitter.thinking or reasoning):
                self.reasoning_tokens += num_tokens
            self.reasoning += reasoning
            if not self.include_reasoning:
                reasoning = ""
        if self.tool_calls is not None:
            content, calls, reason = self.tool_calls.step(text, finished, reason)
        else:
            content, calls = text, []
        self.content += content
        return ChatDelta(reasoning, content, calls, reason)

    def message(self) -> dict[str, Any]:
        """The assistant message: ``content`` (None when empty and the output
        was split or made calls), ``tool_calls``, ``reasoning_content``."""
        if self.tool_calls is not None:
            message = self.tool_calls.message()
        else:
            message = {"role": "assistant", "content": self.content}
        if self.splitter is not None:
            message["content"] = message["content"] or None
            if self.include_reasoning:
                message["reasoning_content"] = self.reasoning or None
        return message
