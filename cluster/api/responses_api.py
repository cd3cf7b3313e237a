"""``POST /v1/responses``: OpenAI's Responses API, stateless, over the same
chat machinery as /v1/chat/completions.

Per request: body -> ``ResponsesRequest`` (splitserve.cluster.api.responses_schema;
``previous_response_id`` is refused: nothing is stored) -> the conversation's
length bounded -> on a preparation thread, the chat prompt
(splitserve.cluster.api.chat_prompt: template, tools, the reasoning split) ->
one backend stream, its first output awaited so that refusals become HTTP
statuses -> each output read as chat (reasoning, content, tool calls) and
turned into output items (splitserve.cluster.api.responses_output) -> one
response object, or the Responses stream:

  response.created, response.in_progress,
  per item: output_item.added, [content_part.added], its deltas
    (reasoning_text / output_text / function_call_arguments), their .done
    events, [content_part.done], output_item.done,
  response.completed, or response.incomplete when max_output_tokens (or the
  context) cut the output.

A failure once the stream has begun is an ``error`` event and then
``response.failed``. A client that leaves cancels the request.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from splitserve.cluster.api.backend import Backend
from splitserve.cluster.api.chat_output import ChatOutput
from splitserve.cluster.api.chat_prompt import ChatPrompt, check_chat_chars, json_chars, prepare_chat
from splitserve.cluster.api.http_stream import (REQUEST_ID_HEADER, TIMINGS_HEADER, Choices, ClientGone, SSEResponse,
                                                api_error, open_choices, sse_data)
from splitserve.cluster.api.http_body import read_request
from splitserve.cluster.api.prepare import PreparePool
from splitserve.cluster.api.request_options import http_options
from splitserve.cluster.api.routing import resolve_http, variant_headers
from splitserve.cluster.api.responses_output import OutputItems, response_usage, status_of
from splitserve.cluster.api.openai_structured import constraint_field, constraint_refusal
from splitserve.cluster.api.responses_schema import ResponsesRequest, prepare_error
from splitserve.engine.errors import InvalidRequestError


def add_route(app: FastAPI, backend: Backend, pool: PreparePool, max_body_bytes: int) -> None:
    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        t0, arrival = time.perf_counter(), time.time()
        body: ResponsesRequest = await read_request(request, ResponsesRequest, max_body_bytes)
        options = http_options(request.headers, body.priority, arrival)
        routed, body = resolve_http(backend, request.headers, body)
        check_chat_chars(body.text_chars(), json_chars(body.tools), json_chars(body.chat_template_kwargs),
                         backend.model_info(body.model).max_model_len, "input")
        chat = await pool.run(_prepare, backend, body)
        rid = f"resp_{uuid.uuid4().hex}"
        prepare_s = time.perf_counter() - t0
        try:
            opened = await open_choices(request, [backend.routing.track(routed, backend.generate(
                body.model, rid, chat.token_ids, chat.params, options))])
        except InvalidRequestError as e:
            raise constraint_refusal(e, constraint_field(
                chat.tools, "text.format" if body.text_format() is not None
                else "structured_outputs", tool_level=False)) from None
        if opened is None:
            return Response(status_code=499)
        choices, first = opened
        answer = _Answer(rid, body, chat, routed.requested)
        if request.headers.get(TIMINGS_HEADER, "").lower() in ("1", "true"):
            answer.timings = {**(first[1].get("timings") or {}), "ingress_prepare_s": prepare_s,
                              "ingress_ttft_s": time.perf_counter() - t0}
        headers = {REQUEST_ID_HEADER: rid, **variant_headers(routed)}
        if body.stream:
            return SSEResponse(choices, _stream(choices, first, answer), headers=headers)
        try:
            item: tuple[int, dict] | None = first
            while item is not None:
                answer.add(item[1])
                item = await choices.next_or_none()
        except ClientGone:
            return Response(status_code=499)
        finally:
            await choices.aclose()
        answer.end()
        return JSONResponse(answer.response(), headers=headers)


def _prepare(backend: Backend, body: ResponsesRequest) -> ChatPrompt:
    """On a preparation thread."""
    try:
        return prepare_chat(backend, body.chat_request())
    except InvalidRequestError as e:
        raise prepare_error(e) from None


class _Answer:
    """The response being built from the backend's outputs."""

    def __init__(self, rid: str, body: ResponsesRequest, chat: ChatPrompt, model: str):
        """``model``: the name the client asked for (a route's, not its variant's)."""
        self.rid, self.body, self.created = rid, body, int(time.time())
        self.model = model
        self.chat = ChatOutput(chat.reasoning, chat.tools.calls() if chat.tools else None)
        self.items = OutputItems()
        self.status: str | None = None  # once the output has ended
        self.usage: dict[str, int] = {"prompt": 0, "completion": 0, "cached": 0}
        self.timings: dict | None = None

    def add(self, out: dict) -> list[dict[str, Any]]:
        """A backend output's stream events."""
        finished = out["finished"]
        delta = self.chat.step(out["text"], len(out["token_ids"]), finished,
                               out["finish_reason"] if finished else None)
        self.usage = {"prompt": out["prompt_tokens"], "completion": out["completion_tokens"],
                      "cached": out["cached_tokens"]}
        events = self.items.add(delta)
        if finished:
            self.status = status_of(delta.finish_reason)
            events += self.items.finish(self.status)
        return events

    def end(self) -> list[dict[str, Any]]:
        """Close the answer if the backend ended it without a finished output."""
        if self.status is not None:
            return []
        self.status = "incomplete"
        return self.items.finish(self.status)

    def response(self, status: str | None = None, error: dict | None = None) -> dict[str, Any]:
        """The response object: as it stands (``status`` given: in_progress,
        failed) or whole."""
        b = self.body
        status = status or self.status
        done = status in ("completed", "incomplete")
        obj = {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "max_tool_calls": b.max_tool_calls, "metadata": b.metadata or {}, "model": self.model,
            "output": [dict(i) for i in self.items.items] if done else [],
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": b.reasoning, "store": False,
            "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": {"format": (b.text or {}).get("format") or {"type": "text"}},
            "tool_choice": b.tool_choice or "auto", "tools": b.tools or [],
            "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": "disabled",
            "usage": response_usage(self.usage["prompt"], self.usage["completion"],
                                    self.usage["cached"], self.chat.reasoning_tokens)
            if done else None,
            "user": b.user,
        }
        if self.timings is not None:
            obj["splitserve_timings"] = self.timings
        return obj


def _error_code(status: int) -> str:
    return {429: "rate_limit_exceeded"}.get(status, "invalid_prompt" if status < 500 else "server_error")


async def _stream(choices: Choices, first: tuple[int, dict], answer: _Answer) -> AsyncIterator[bytes]:
    seq = itertools.count()

    def sse(event: dict[str, Any]) -> bytes:
        return sse_data({**event, "sequence_number": next(seq)}, event["type"])

    yield sse({"type": "response.created", "response": answer.response("in_progress")})
    yield sse({"type": "response.in_progress", "response": answer.response("in_progress")})
    item: tuple[int, dict] | None = first
    try:
        while item is not None:
            for event in answer.add(item[1]):
                yield sse(event)
            item = await choices.next_or_none()
    except ClientGone:
        return
    except Exception as e:  # noqa: BLE001 - headers are sent: report it in the stream
        err = api_error(e)
        body = err.body()["error"]  # bounded in size
        yield sse({"type": "error", "code": body["code"], "message": body["message"],
                   "param": body["param"]})
        yield sse({"type": "response.failed", "response": answer.response(
            "failed", {"code": _error_code(err.status), "message": body["message"]})})
        return
    for event in answer.end():
        yield sse(event)
    final = answer.response()
    yield sse({"type": f"response.{final['status']}", "response": final})
