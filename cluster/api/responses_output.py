"""A Responses API answer built from one chat choice's deltas
(splitserve.cluster.api.chat_output.ChatDelta): its output items and, for
streaming, the events that build them.

Items come in the order the output makes them: a ``reasoning`` item (the
reasoning parser's text), a ``message`` (content as one ``output_text``
part), ``function_call`` items (one per tool call). Whitespace-only content
before calls is dropped, as chat completions drop it. A streamed response
and a whole one are the same ``OutputItems`` run over the same deltas, so
they hold the same items.
"""

from __future__ import annotations

import uuid
from typing import Any

from splitserve.cluster.api.chat_output import ChatDelta


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    """``add(delta)`` and ``finish(status)`` return the stream events (without
    ``sequence_number``) of what they add; ``items`` are the output items."""

    def __init__(self):
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item deltas still extend
        self._pending_space = ""  # whitespace-only content not yet given to a message
        self._made_calls = False

    def add(self, delta: ChatDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if delta.reasoning:
            events += self._extend("reasoning", delta.reasoning)
        if delta.content:
            text = self._pending_space + delta.content
            if self._is_open("message") or text.strip():
                self._pending_space = ""
                events += self._extend("message", text)
            else:
                self._pending_space = text
        for call in delta.tool_calls:
            events += self._call(call)
        return events

    def finish(self, status: str) -> list[dict[str, Any]]:
        """Close the last item; ``status``: completed, or incomplete (cut short)."""
        events = []
        if self._pending_space and not self._made_calls:
            events += self._extend("message", self._pending_space)
        self._pending_space = ""
        return events + self._close(status)

    def _is_open(self, kind: str) -> bool:
        return self._open is not None and self._open["type"] == kind

    def _extend(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = [] if self._is_open(kind) else self._close("completed") + self._start(kind)
        self._open["content"][0]["text"] += text
        if kind == "reasoning":
            return events + [{"type": "response.reasoning_text.delta", **self._where(),
                              "content_index": 0, "delta": text}]
        return events + [{"type": "response.output_text.delta", **self._where(),
                          "content_index": 0, "delta": text, "logprobs": []}]

    def _start(self, kind: str) -> list[dict[str, Any]]:
        if kind == "reasoning":
            item = {"id": _id("rs"), "type": "reasoning", "summary": [], "status": "in_progress",
                    "content": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": _id("msg"), "type": "message", "role": "assistant",
                    "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._open = item
        self.items.append(item)
        added = [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                  "item": _copy(item)},
                 {"type": "response.content_part.added", **self._where(), "content_index": 0,
                  "part": dict(part)}]
        item["content"].append(part)
        return added

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        fn = call.get("function", {})
        events = []
        if "id" in call:  # a call's first delta
            events += self._close("completed")
            item = {"id": _id("fc"), "type": "function_call", "call_id": call["id"],
                    "name": fn.get("name", ""), "arguments": "", "status": "in_progress"}
            self._open, self._made_calls = item, True
            self.items.append(item)
            events.append({"type": "response.output_item.added",
                           "output_index": len(self.items) - 1, "item": _copy(item)})
        if fn.get("arguments") and self._is_open("function_call"):
            self._open["arguments"] += fn["arguments"]
            events.append({"type": "response.function_call_arguments.delta", **self._where(),
                           "delta": fn["arguments"]})
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _close(self, status: str) -> list[dict[str, Any]]:
        item = self._open
        if item is None:
            return []
        where = self._where()
        item["status"] = status
        self._open = None
        if item["type"] == "function_call":
            done = [{"type": "response.function_call_arguments.done", **where,
                     "arguments": item["arguments"]}]
        else:
            part = item["content"][0]
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            text_done = {"type": f"response.{kind}.done", **where, "content_index": 0,
                         "text": part["text"]}
            if kind == "output_text":
                text_done["logprobs"] = []
            done = [text_done, {"type": "response.content_part.done", **where, "content_index": 0,
                                "part": dict(part)}]
        return done + [{"type": "response.output_item.done", "output_index": where["output_index"],
                        "item": _copy(item)}]


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "content": [dict(p) for p in item["content"]]} if "content" in item else dict(item)


def response_usage(prompt_tokens: int, output_tokens: int, cached_tokens: int,
                   reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + output_tokens}


def status_of(finish_reason: str | None) -> str:
    """A finished output's response status: a cut one (length) is incomplete."""
    return "completed" if finish_reason in ("stop", "tool_calls") else "incomplete"
