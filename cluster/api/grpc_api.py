"""The splitserve gRPC API (``splitserve.v1.Generation``) and the standard
``grpc.health.v1`` health service (splitserve.cluster.api.health: it
follows the backend's readiness), over a ``Backend``.

Generate, per call: API key (interceptor) -> a route names its variant
(splitserve.cluster.api.routing; initial metadata ``x-splitserve-variant``)
-> the prompt's length in
characters bounded (splitserve.engine.limits) -> on a preparation thread
(splitserve.cluster.api.prepare): prompt token ids (text tokenized, or the
chat template applied to messages, tools and chat_template_kwargs), grammars
compiled, ``Backend.validate`` -> the backend stream, forwarded one response
per output (for a chat: reasoning split off, then tool calls parsed;
splitserve.cluster.api.chat_output). Tokenize does its work on the same threads. The handler's
task is cancelled when the client cancels or its deadline passes; closing
the backend stream then cancels the request and frees its KV blocks.

Status codes: INVALID_ARGUMENT (the field in the details and in trailing
metadata ``splitserve-param``), NOT_FOUND (unknown model),
RESOURCE_EXHAUSTED (overloaded, with trailing ``retry-after`` seconds; or a
message over ``max_message_bytes``, refused by gRPC itself with the server
still up; a request that is not a valid message, e.g. a string that is not
UTF-8, is INVALID_ARGUMENT with an empty param), UNAVAILABLE (with ``retry-after``), UNAUTHENTICATED,
DEADLINE_EXCEEDED, INTERNAL (a server fault).

Transport bounds (``start_grpc_server``; docs/api.md lists each hostile
client's answer): a stream its client stops reading ends after
``write_stall_s``; metadata past ``MAX_METADATA_BYTES`` is
RESOURCE_EXHAUSTED; a request that never arrives whole is INVALID_ARGUMENT;
a connection holds ``MAX_STREAMS_PER_CONNECTION`` streams and is closed
after ``idle_s`` without a call.

Traced (a tracer given): each Generate call is an ``ingress`` span, child
of the client's W3C ``traceparent`` metadata when it sends one, and the
task's ``ingress_span`` while it runs (``ClusterBackend.generate`` adds the
request's attributes); a status other than OK is recorded on it.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from pathlib import Path

import grpc

from splitserve.cluster.api.backend import (Backend, DeadlineExceeded, Overloaded, Unavailable,
                                           UnknownModel)
from splitserve.cluster.api.chat_output import ChatOutput
from splitserve.cluster.api.grpc_interceptors import (DETAILS_CHARS, PARAM_METADATA,
                                                     ApiKeyInterceptor, DecodeErrorInterceptor,
                                                     MetadataLimitInterceptor, OneRequestInterceptor)
from splitserve.cluster.api.grpc_stall import WRITE_STALL_S, WriteStallInterceptor
from splitserve.cluster.api.grpc_messages import (chat_messages, chat_template_kwargs, check_chat_chars,
                                                 generate_response, messages_chars, request_tools,
                                                 sampling_params, template_tools)
from splitserve.cluster.api.health import HealthService
from splitserve.cluster.api.prepare import INLINE_MESSAGES, PreparePool, shared_pool
from splitserve.cluster.api.proto import health_pb2_grpc
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.api.reasoning import Reasoning, reasoning_for
from splitserve.cluster.api.request_options import grpc_options
from splitserve.cluster.api.routing import VARIANT_HEADER, Routed, all_models
from splitserve.cluster.api.openai_structured import constraint_field, constraint_refusal
from splitserve.cluster.api.tool_calls import ToolRequest
from splitserve.engine.errors import InvalidRequestError, SplitserveError
from splitserve.engine.limits import MAX_REQUEST_ID_CHARS, check_prompt_chars
from splitserve.engine.sampling_params import SamplingParams
from splitserve.cluster.observability.tracing import set_ingress_span
from splitserve.handoff.tracing import SPAN_INGRESS, Span, Tracer

log = logging.getLogger("splitserve.grpc")

CONNECTION_IDLE_S = 300.0  # a connection without a call this long is closed (clients reconnect)
# a call's metadata, all entries together (HTTP's MAX_HEAD_BYTES); also gRPC's
# own limit, which a raw client's uncompressed literal passes
# (splitserve.cluster.api.grpc_interceptors.MetadataLimitInterceptor)
MAX_METADATA_BYTES = 64 << 10
MAX_STREAMS_PER_CONNECTION = 1024  # a bound on what one connection holds; past it the client queues


def status_for(e: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) of an exception raised while
    preparing or generating a request."""
    if isinstance(e, InvalidRequestError):
        details = f"{e.param}: {e}" if e.param else str(e)
        return grpc.StatusCode.INVALID_ARGUMENT, details, ((PARAM_METADATA, e.param or ""),)
    if isinstance(e, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(e), ()
    if isinstance(e, (Overloaded, Unavailable)):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(e, Overloaded) else grpc.StatusCode.UNAVAILABLE
        return code, str(e), (("retry-after", str(max(1, math.ceil(e.retry_after_s)))),)
    if isinstance(e, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(e), ()
    if isinstance(e, SplitserveError):
        return grpc.StatusCode.INTERNAL, str(e), ()
    log.exception("gRPC call failed", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}", ()


async def _abort(context: grpc.aio.ServicerContext, e: BaseException,
                 span: Span | None = None, recorded: bool = False) -> None:
    """Fail the call with ``e``'s status; on ``span`` (unless the backend
    ``recorded`` the failure already) when it is not the client's mistake."""
    code, details, trailing = status_for(e)
    if span is not None:
        span.set("rpc.grpc.status_code", code.value[0])
        if not recorded and code not in (grpc.StatusCode.INVALID_ARGUMENT,
                                          grpc.StatusCode.NOT_FOUND):
            span.fail(e)
    if len(details) > DETAILS_CHARS:
        details = details[: DETAILS_CHARS - 3] + "..."
    await context.abort(code, details, trailing_metadata=trailing)


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, backend: Backend, pool: PreparePool | None = None,
                 tracer: Tracer | None = None):
        self.backend = backend
        self.pool = pool or shared_pool()
        self.tracer = tracer

    def _check_chars(self, req: pb.GenerateRequest | pb.TokenizeRequest) -> None:
        """The prompt's text bounded by the model's context before any
        tokenizing (on the loop: it only counts)."""
        max_model_len = self.backend.model_info(req.model).max_model_len
        if req.messages:
            check_chat_chars(req, max_model_len)
        else:
            check_prompt_chars(len(req.text), max_model_len, "text")

    def _prompt(self, req: pb.GenerateRequest, tools: ToolRequest | None) -> tuple[list[int], str | None]:
        """(prompt token ids, the rendered chat or None for a plain prompt)."""
        tokenizer = self.backend.tokenizer(req.model)
        which = req.WhichOneof("prompt")
        if req.messages:
            if which is not None:
                raise InvalidRequestError("send either a prompt or messages, not both", param="messages")
            text = tokenizer.apply_chat_template(chat_messages(req.messages),
                                                 tools=tools.tools if tools else None,
                                                 **chat_template_kwargs(req.chat_template_kwargs))
            return tokenizer.encode(text, add_special_tokens=False), text  # the template wrote BOS
        if req.chat_template_kwargs:
            raise InvalidRequestError("chat_template_kwargs need a chat (messages)",
                                      param="chat_template_kwargs")
        if which == "text":
            if not req.text:
                raise InvalidRequestError("the prompt text is empty", param="prompt")
            return tokenizer.encode(req.text), None
        if which == "token_ids":
            return list(req.token_ids.ids), None
        raise InvalidRequestError("a prompt (text or token_ids) or messages is required", param="prompt")

    @staticmethod
    def _size(req: pb.GenerateRequest) -> int | None:
        """The prompt's characters or tokens (``PreparePool.run``'s ``size``);
        None when preparing may compile a grammar (tools, structured output)
        or renders many messages."""
        if (req.tools or req.tool_choice or req.tool_function or req.chat_template_kwargs
                or req.params.HasField("structured_output")
                or len(req.messages) > INLINE_MESSAGES):
            return None
        if req.messages:
            return messages_chars(req.messages)
        return len(req.text) + len(req.token_ids.ids)

    def _prepare(self, request: pb.GenerateRequest
                 ) -> tuple[ToolRequest | None, list[int], SamplingParams, Reasoning | None]:
        """(tools, prompt token ids, sampling params, the reasoning split),
        validated; on a preparation thread."""
        chat_template = self.backend.tokenizer(request.model).chat_template
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:  # it is echoed on every response
            raise InvalidRequestError(f"request_id has {len(request.request_id)} characters; at most "
                                      f"{MAX_REQUEST_ID_CHARS}", param="request_id")
        tools = request_tools(request, chat_template, self.backend.tool_call_parser(request.model))
        ids, chat_text = self._prompt(request, tools)
        params = sampling_params(request.params)
        if tools is not None:
            params = tools.sampling(params)
        reasoning = None
        if chat_text is not None and (tools is None or tools.choice in ("none", "auto")):
            reasoning = reasoning_for(self.backend.reasoning_parser(request.model), chat_template,
                                      chat_text, params.structured_output is not None)
        try:
            self.backend.validate(request.model, ids, params)
        except InvalidRequestError as e:
            if request.messages and e.param == "prompt":
                raise InvalidRequestError(str(e), param="messages") from None
            raise
        return tools, ids, params, reasoning

    def _route(self, request: pb.GenerateRequest, context) -> tuple[Routed, pb.GenerateRequest]:
        """Where the request goes (a route picks a variant by the client key
        in its key header's metadata), and the request naming that model."""
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())
                    if isinstance(v, str)}
        routed = self.backend.routing.resolve(
            request.model, lambda header: metadata.get(header) if header else None)
        if routed.route is None:
            return routed, request
        copy = pb.GenerateRequest()
        copy.CopyFrom(request)
        copy.model = routed.model
        return routed, copy

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        span = None
        if self.tracer is not None:
            # the call runs in a task of its own: the variable stays with it
            span = self.tracer.start(SPAN_INGRESS, dict(context.invocation_metadata() or ()).get(
                "traceparent"), server=True, attributes={
                    "splitserve.api": "grpc", "rpc.system": "grpc",
                    "rpc.method": "splitserve.v1.Generation/Generate"})
            set_ingress_span(span)
        t0 = time.perf_counter()
        options = grpc_options(request.priority, context.time_remaining(), time.time())
        routed, request = self._route(request, context)
        if routed.route is not None:
            await context.send_initial_metadata(((VARIANT_HEADER, routed.model),))
        try:
            try:
                self._check_chars(request)
                tools, ids, params, reasoning = await self.pool.run(
                    self._prepare, request, size=self._size(request))
            except Exception as e:  # noqa: BLE001 - every refusal becomes a status
                await _abort(context, e, span)
            # The backend id is always fresh: a client's request_id may repeat.
            backend_id = f"grpc-{uuid.uuid4().hex}"
            request_id = request.request_id or backend_id
            prepare_s = time.perf_counter() - t0
            stream = self.backend.routing.track(
                routed, self.backend.generate(request.model, backend_id, ids, params, options))
            chat = None
            if tools is not None or reasoning is not None:
                chat = ChatOutput(reasoning, tools.calls() if tools is not None else None)
            failure = None
            try:
                first = True
                async for out in stream:
                    timings = None
                    if first:
                        backend_timings = {k: float(v) for k, v in (out.get("timings") or {}).items()
                                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
                        timings = {**backend_timings, "ingress_prepare_s": prepare_s,
                                   "ingress_ttft_s": time.perf_counter() - t0}
                        first = False
                    yield generate_response(out, request_id, timings, chat)
            except Exception as e:  # noqa: BLE001 - reported as the call's status below
                failure = constraint_refusal(
                    e, constraint_field(tools, "structured_output", tool_level=False))
            finally:
                await stream.aclose()
            if failure is not None:
                await _abort(context, failure, span, recorded=True)
        finally:
            if span is not None:
                span.end()

    def _tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """On a preparation thread."""
        tokenizer = self.backend.tokenizer(request.model)
        info = self.backend.model_info(request.model)
        if request.messages:
            if request.text:
                raise InvalidRequestError("send either text or messages, not both", param="messages")
            tools = template_tools(request.tools) if request.tools else None
            prompt = tokenizer.apply_chat_template(chat_messages(request.messages), tools=tools,
                                                   **chat_template_kwargs(request.chat_template_kwargs))
            ids = tokenizer.encode(prompt, add_special_tokens=False)
        else:
            if request.tools or request.chat_template_kwargs:
                param = "tools" if request.tools else "chat_template_kwargs"
                raise InvalidRequestError(f"{param} need a chat (messages)", param=param)
            prompt = ""
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = tokenizer.encode(request.text, add_special_tokens=add)
        return pb.TokenizeResponse(token_ids=ids, prompt=prompt, max_model_len=info.max_model_len)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            self._check_chars(request)
            return await self.pool.run(self._tokenize, request)
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelCard(name=m.name, max_model_len=m.max_model_len, created=m.created,
                         parent=m.parent or "")
            for m in all_models(self.backend)])


async def start_grpc_server(backend: Backend, host: str, port: int, api_keys: list[str],
                            tls_cert: str | None = None, tls_key: str | None = None,
                            max_message_bytes: int = 4 << 20,
                            health: HealthService | None = None,
                            pool: PreparePool | None = None,
                            open_health: bool = False,
                            tracer: Tracer | None = None,
                            write_stall_s: float = WRITE_STALL_S,
                            idle_s: float = CONNECTION_IDLE_S) -> tuple[grpc.aio.Server, int]:
    """Start serving on ``host:port`` (0: a free port); returns the server
    and the bound port. TLS when both certificate and key (PEM files) are
    given. The health service reports the backend's readiness; pass
    ``health`` to also report NOT_SERVING (``set_serving(False)``) while
    draining. ``open_health``: the health service answers without an API
    key (Kubernetes' gRPC probes send none). ``pool``: where requests are
    tokenized (default: the process's shared pool). ``tracer``: each
    Generate call is an ``ingress`` span. A response stream whose client
    reads nothing for ``write_stall_s`` is ended (splitserve.cluster.api.grpc_stall);
    a connection with no call for ``idle_s`` (one that never starts a call
    included) is closed with GOAWAY. Stop with ``await server.stop(grace)``."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both grpc_tls_cert and grpc_tls_key (PEM files), or neither")
    interceptors = [ApiKeyInterceptor(api_keys, open_health)] if api_keys else []
    server = grpc.aio.server(
        # the stall guard first: it wraps the handlers the others return
        interceptors=[WriteStallInterceptor(write_stall_s), MetadataLimitInterceptor(MAX_METADATA_BYTES),
                      *interceptors, OneRequestInterceptor(), DecodeErrorInterceptor()],
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes),
                 ("grpc.max_connection_idle_ms", int(idle_s * 1000)),
                 # soft = hard limit: every call past it is refused, none by chance
                 ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                 ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
                 # a connection's streams at once: past this the client queues them
                 ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                 # several ingress replicas on one node listen on one port (gRPC's
                 # default on Linux, stated because the ingress relies on it)
                 ("grpc.so_reuseport", 1)])
    pb_grpc.add_GenerationServicer_to_server(GenerationService(backend, pool, tracer), server)
    health = health or HealthService()
    health.follow(backend)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{host}:{port}"
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, bound
