"""The OpenAI-compatible HTTP API over a ``Backend``.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /v1/models/{id}; POST /v1/load_lora_adapter, /v1/unload_lora_adapter
(splitserve.cluster.api.adapters_api); probes GET /health, /ready, /version
(splitserve.cluster.api.health); POST /tokenize, /detokenize
(splitserve.cluster.api.tokenize_api); GET /metrics
(splitserve.cluster.api.metrics_endpoint). Every route needs the API key
when keys are configured, except those
``ObservabilitySpec.unauthenticated_routes`` opens.

Per request: API key -> body read up to the size limit, within
``endpoints.body_timeout_s`` (splitserve.cluster.api.body_deadline) ->
JSON (nesting bounded) -> request model -> a route's variant picked
(splitserve.cluster.api.routing: the response echoes the route's name and
names the variant in the ``x-splitserve-variant`` header) -> the prompt's length in
characters bounded (splitserve.engine.limits) -> on a preparation thread
(splitserve.cluster.api.prepare): prompt token ids (chat template applied,
with the tools; splitserve.cluster.api.tool_calls), grammars compiled,
``Backend.validate`` -> one backend stream per choice -> the first output
awaited, so that refusals (overload, an unknown model) become HTTP
statuses rather than broken streams -> one JSON body, or SSE chunks.

A client that goes away, mid-stream or while waiting for a whole
completion, closes the backend streams: that cancels the requests and
frees their KV blocks. Every error has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

POST /v1/responses (OpenAI's Responses API) is served by
splitserve.cluster.api.responses_api over the same chat preparation.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from splitserve.cluster.api import openai_schema as schema
from splitserve.cluster.api import responses_api
from splitserve.cluster.api.adapters_api import add_adapter_routes
from splitserve.cluster.api.body_deadline import BodyDeadline
from splitserve.cluster.api.backend import Backend, ModelInfo, RequestOptions
from splitserve.cluster.api.chat_prompt import (ChatPrompt, check_chat_chars, json_chars, prepare_chat,
                                                template_kwargs)
from splitserve.cluster.api.health import add_health_routes
from splitserve.cluster.api.http_stream import (  # noqa: F401 - api_error, choice_params: re-exported
    REQUEST_ID_HEADER, TIMINGS_HEADER, ClientGone, Choices, SSEResponse, api_error, choice_params,
    open_choices, sse_data)
from splitserve.cluster.api.metrics_endpoint import METRICS_PATH, add_metrics_route
from splitserve.cluster.api.openai_response import ChoiceState, Echo, usage
from splitserve.cluster.api.http_body import read_request
from splitserve.cluster.api.http_tracing import EVENT_BODY_READ, mark
from splitserve.cluster.api.openai_schema import ApiError
from splitserve.cluster.api.openai_structured import constraint_field, constraint_refusal
from splitserve.cluster.api.prepare import INLINE_MESSAGES, PreparePool, shared_pool
from splitserve.cluster.api.request_options import http_options
from splitserve.cluster.api.reasoning import Reasoning
from splitserve.cluster.api.routing import Routed, all_models, model_info, resolve_http, variant_headers
from splitserve.cluster.api.tokenize_api import add_tokenize_routes
from splitserve.cluster.api.tool_calls import ToolRequest
from splitserve.cluster.config import EndpointSpec, ObservabilitySpec
from splitserve.engine.auth import secret_matches
from splitserve.engine.errors import InvalidRequestError, SplitserveError
from splitserve.engine.limits import check_prompt_chars
from splitserve.handoff.tracing import Tracer


def _key_ok(authorization: str | None, keys: list[bytes]) -> bool:
    if not authorization or not authorization[:7].lower() == "bearer ":
        return False
    return secret_matches(authorization[7:].strip(), *keys)


# the paths each ObservabilitySpec.unauthenticated_routes entry opens
OPEN_PATHS = {"health": ("/health", "/ready", "/version"), "metrics": (METRICS_PATH,)}


class _ApiKeyGuard:
    """ASGI middleware: 401 on every route but ``open_paths`` unless
    ``Authorization: Bearer <key>`` names a configured key."""

    def __init__(self, app, api_keys: list[str], open_paths: frozenset[str] = frozenset()):
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"] not in self.open_paths:
            # two Authorization headers are refused whatever they hold:
            # taking the first would let a proxy that checks the last (or
            # the other way round) disagree with this check
            given = Headers(scope=scope).getlist("authorization")
            if len(given) != 1 or not _key_ok(given[0], self.keys):
                message = ("missing or invalid API key: send 'Authorization: Bearer <key>'"
                           if len(given) < 2 else "send one Authorization header, not "
                           f"{len(given)}")
                err = ApiError(401, message, "authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


def model_card(m: ModelInfo) -> dict:
    """A model's card; a LoRA adapter's ``parent`` is its base model (null
    for a base model), as vLLM lists them."""
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "splitserve",
            "max_model_len": m.max_model_len, "parent": m.parent}


def build_http_app(backend: Backend, api_keys: list[str], max_body_bytes: int,
                   pool: PreparePool | None = None,
                   observability: ObservabilitySpec | None = None,
                   tracer: Tracer | None = None,
                   body_timeout_s: float = EndpointSpec.model_fields["body_timeout_s"].default,
                   ) -> FastAPI:
    """``pool``: where requests are tokenized (default: the process's
    shared pool, which the gRPC server uses too); ``observability``: which
    probes and metrics need no key, and whether /metrics adds vLLM's names;
    ``tracer``: each generation request becomes an ``ingress`` span
    (``splitserve.cluster.api.http_tracing``); ``body_timeout_s``: how
    long a request body may take to arrive (``BodyDeadline``)."""
    pool = pool or shared_pool()
    observability = observability or ObservabilitySpec()
    app = FastAPI(title="splitserve", docs_url=None, redoc_url=None, openapi_url=None)
    # a path with a trailing slash is a 404 like any unknown path: Starlette's
    # 307 to the path without it names a URL built from the client's Host
    # header, with the scheme the server saw (http behind TLS termination)
    app.router.redirect_slashes = False

    async def on_error(_request: Request, exc: Exception) -> Response:
        return api_error(exc).response()

    async def on_http_exception(request: Request, exc: HTTPException) -> Response:
        message = (f"no route {request.method} {request.url.path[:200]}" if exc.status_code in (404, 405)
                   else str(exc.detail))
        return ApiError(exc.status_code, message, code="unknown_route").response()

    app.add_exception_handler(ApiError, on_error)
    app.add_exception_handler(SplitserveError, on_error)
    app.add_exception_handler(HTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_error)

    add_health_routes(app, backend)
    add_metrics_route(app, backend, observability.vllm_metric_names)
    add_tokenize_routes(app, backend, max_body_bytes, pool)
    add_adapter_routes(app, backend, model_card)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(m) for m in all_models(backend)]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        return model_card(model_info(backend, model_id))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        t0, arrival = time.perf_counter(), time.time()
        body: schema.CompletionRequest = await read_request(
            request, schema.CompletionRequest, max_body_bytes)
        mark(EVENT_BODY_READ)
        options = http_options(request.headers, body.priority, arrival)
        routed, body = resolve_http(backend, request.headers, body)
        prompts = body.prompt_inputs()
        max_model_len = backend.model_info(body.model).max_model_len
        for p in prompts:
            if isinstance(p, str):
                check_prompt_chars(len(p), max_model_len, "prompt")
        batch, params, echoes = await pool.run(_prepare_completion, backend, body, prompts,
                                               size=_completion_size(body, prompts))
        return await _respond(request, backend, "completion", body, batch, params, t0, options,
                              echoes=echoes, routed=routed)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        t0, arrival = time.perf_counter(), time.time()
        body: schema.ChatCompletionRequest = await read_request(
            request, schema.ChatCompletionRequest, max_body_bytes)
        mark(EVENT_BODY_READ)
        options = http_options(request.headers, body.priority, arrival)
        routed, body = resolve_http(backend, request.headers, body)
        kwargs = template_kwargs(body.chat_template_kwargs)
        check_chat_chars(body.text_chars(), json_chars(body.tools), json_chars(body.chat_template_kwargs),
                         backend.model_info(body.model).max_model_len)
        chat = await pool.run(_prepare_chat, backend, body, kwargs, size=_chat_size(body))
        return await _respond(request, backend, "chat", body, [chat.token_ids], chat.params, t0,
                              options, chat.tools, reasoning=chat.reasoning, routed=routed)

    responses_api.add_route(app, backend, pool, max_body_bytes)

    open_paths = frozenset(p for r in observability.unauthenticated_routes for p in OPEN_PATHS[r])
    # inside the key check: an unauthenticated client is refused before its body is read
    app.add_middleware(BodyDeadline, timeout_s=body_timeout_s)
    app.add_middleware(_ApiKeyGuard, api_keys=list(api_keys), open_paths=open_paths)
    if tracer is not None:  # outside the key check: refused requests are traced too
        from splitserve.cluster.api.http_tracing import TracingMiddleware

        app.add_middleware(TracingMiddleware, tracer=tracer)
    return app


def _completion_size(body: schema.CompletionRequest, prompts: list[str | list[int]]
                     ) -> int | None:
    """The prompts' characters and tokens (``PreparePool.run``'s ``size``);
    None when preparing may compile a grammar."""
    if body.structured_outputs is not None or body.response_format is not None:
        return None
    return sum(len(p) for p in prompts)


def _chat_size(body: schema.ChatCompletionRequest) -> int | None:
    """The messages' characters (``PreparePool.run``'s ``size``); None when
    preparing may compile a grammar (tools, structured output) or renders
    many messages."""
    if (body.structured_outputs is not None or body.response_format is not None
            or body.tools or body.tool_choice is not None
            or len(body.messages) > INLINE_MESSAGES
            or body.chat_template_kwargs):
        return None
    return body.text_chars()


def _prepare_completion(backend: Backend, body: schema.CompletionRequest,
                        prompts: list[str | list[int]]):
    """(token ids per prompt, sampling params, echoes or None); on a
    preparation thread."""
    tokenizer = backend.tokenizer(body.model)
    batch = [tokenizer.encode(p, add_special_tokens=body.add_special_tokens) if isinstance(p, str)
             else list(p) for p in prompts]
    params = body.completion_params()
    for ids in batch:
        backend.validate(body.model, ids, params)
    echoes = None
    if body.echo:
        echoes = [Echo(p if isinstance(p, str) else tokenizer.decode(ids, skip_special_tokens=False),
                       ids, score_only=body.max_tokens == 0) for p, ids in zip(prompts, batch)]
    return batch, params, echoes


def _prepare_chat(backend: Backend, body: schema.ChatCompletionRequest, kwargs: dict) -> ChatPrompt:
    """On a preparation thread."""
    try:
        return prepare_chat(backend, body.chat_request(kwargs))
    except InvalidRequestError as e:
        # name the fields of the chat request, not of the engine
        rename = {"max_tokens": body.max_tokens_param, "logprobs": "top_logprobs"}
        raise schema.renamed(e, rename) from None


async def _respond(request: Request, backend: Backend, kind: str, body, batch: list[list[int]],
                   params, t0: float, options: RequestOptions,
                   tools: ToolRequest | None = None,
                   echoes: list[Echo] | None = None, reasoning: Reasoning | None = None,
                   routed: Routed | None = None) -> Response:
    """Choice k answers prompt k // n (choice k % n of it), each choice its
    own backend request. ``routed``: the request named a route; ``body``
    names the variant that serves it, responses echo the route's name."""
    routed = routed or Routed(body.model, body.model)
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    rid = f"{prefix}-{uuid.uuid4().hex}"
    n = params.n
    jobs = [(j, i) for j in range(len(batch)) for i in range(n)]
    if len(jobs) > 1:  # the choices are admitted all or none
        options = dataclasses.replace(options, choices=(rid, len(jobs)))
    streams = [backend.routing.track(routed, backend.generate(
        body.model, rid if len(jobs) == 1 else f"{rid}-{k}", batch[j], choice_params(params, i),
        options)) for k, (j, i) in enumerate(jobs)]
    prepare_s = time.perf_counter() - t0
    try:
        opened = await open_choices(request, streams)
    except InvalidRequestError as e:
        raise constraint_refusal(e, constraint_field(
            tools, "structured_outputs" if body.structured_outputs is not None
            else "response_format")) from None
    if opened is None:
        return Response(status_code=499)
    choices, first = opened
    timings = None
    if request.headers.get(TIMINGS_HEADER, "").lower() in ("1", "true"):
        timings = {**(first[1].get("timings") or {}), "ingress_prepare_s": prepare_s,
                   "ingress_ttft_s": time.perf_counter() - t0}
    tokenizer = backend.tokenizer(body.model)
    states = [ChoiceState(k, kind, tokenizer, params.logprobs is not None, tools and tools.calls(),
                          echoes[j] if echoes else None, reasoning) for k, (j, _) in enumerate(jobs)]
    head = {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
            "created": int(time.time()), "model": routed.requested}
    headers = {REQUEST_ID_HEADER: rid, **variant_headers(routed)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(choices, _sse(choices, first, states, head, timings, include_usage, n),
                            headers=headers)
    try:
        item = first
        while item is not None:
            states[item[0]].add(item[1])
            item = await choices.next_or_none()
    except ClientGone:
        return Response(status_code=499)
    finally:
        await choices.aclose()
    result = {**head, "choices": [s.final() for s in states], "usage": _usage(states, n)}
    if timings is not None:
        result["splitserve_timings"] = timings
    return JSONResponse(result, headers=headers)


def _usage(states: list[ChoiceState], n: int) -> dict:
    """Each prompt counted once (its n choices share it), every choice's output."""
    groups = [states[j:j + n] for j in range(0, len(states), n)]
    return usage(sum(max(s.prompt_tokens for s in g) for g in groups),
                 sum(s.completion_tokens for s in states),
                 sum(max(s.cached_tokens for s in g) for g in groups))


async def _sse(choices: Choices, first: tuple[int, dict], states: list[ChoiceState], head: dict,
               timings: dict | None, include_usage: bool, n: int) -> AsyncIterator[bytes]:
    chunk_head = {**head, "object": "text_completion" if head["object"] == "text_completion"
                  else "chat.completion.chunk"}
    if states[0].kind == "chat":  # OpenAI opens each choice with the role
        for s in states:
            chunk = {**chunk_head, "choices": [s.opening_delta()]}
            if timings is not None:
                chunk["splitserve_timings"], timings = timings, None
            yield sse_data(chunk)
    item: tuple[int, dict] | None = first
    try:
        while item is not None:
            choice = states[item[0]].add(item[1])
            if choice is not None:
                chunk = {**chunk_head, "choices": [choice]}
                if timings is not None:
                    chunk["splitserve_timings"], timings = timings, None
                yield sse_data(chunk)
            item = await choices.next_or_none()
    except ClientGone:
        return
    except Exception as e:  # noqa: BLE001 - headers are sent: report it in the stream
        yield sse_data(api_error(e).body())
    else:
        if include_usage:
            yield sse_data({**chunk_head, "choices": [], "usage": _usage(states, n)})
    yield b"data: [DONE]\n\n"
