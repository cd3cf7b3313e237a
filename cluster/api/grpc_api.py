"""The splitserve gRPC API (``splitserve.v1.Generation``) and the standard
``grpc.health.v1`` health service, over a ``Backend``.

Generate, per call: API key (interceptor) -> prompt token ids (text
tokenized, or the chat template applied to messages and tools) ->
``Backend.validate``
-> the backend stream, forwarded one response per output. The handler's
task is cancelled when the client cancels or its deadline passes; closing
the backend stream then cancels the request and frees its KV blocks.

Status codes: INVALID_ARGUMENT (the field in the details and in trailing
metadata ``splitserve-param``), NOT_FOUND (unknown model),
RESOURCE_EXHAUSTED (overloaded, with trailing ``retry-after`` seconds; or a
message over ``max_message_bytes``, refused by gRPC itself with the server
still up), UNAVAILABLE (with ``retry-after``), UNAUTHENTICATED,
DEADLINE_EXCEEDED, INTERNAL (a server fault).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from pathlib import Path

import grpc

from splitserve.cluster.api.backend import (Backend, DeadlineExceeded, Overloaded, Unavailable,
                                           UnknownModel)
from splitserve.cluster.api.proto import health_pb2, health_pb2_grpc
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.api.tool_calls import ToolCalls, ToolRequest, template_messages, tool_request
from splitserve.engine.auth import secret_matches
from splitserve.engine.errors import InvalidRequestError, SplitserveError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.structured import check_spec, choice_spec, json_object_spec

log = logging.getLogger("splitserve.grpc")

DETAILS_CHARS = 1024  # status details stay small whatever the request echoed
PARAM_METADATA = "splitserve-param"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
_Serving = health_pb2.HealthCheckResponse


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


async def _abort(context: grpc.aio.ServicerContext, e: BaseException) -> None:
    code, details, trailing = status_for(e)
    if len(details) > DETAILS_CHARS:
        details = details[: DETAILS_CHARS - 3] + "..."
    await context.abort(code, details, trailing_metadata=trailing)


def sampling_params(p: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. Not validated
    here: the backend validates (and knows the context length)."""
    def opt(name: str, default):
        return getattr(p, name) if p.HasField(name) else default

    params = SamplingParams(
        max_tokens=opt("max_tokens", None), temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0), top_k=opt("top_k", -1), min_p=opt("min_p", 0.0),
        seed=opt("seed", None), presence_penalty=opt("presence_penalty", 0.0),
        frequency_penalty=opt("frequency_penalty", 0.0),
        repetition_penalty=opt("repetition_penalty", 1.0),
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens, logprobs=opt("logprobs", None),
        prompt_logprobs=opt("prompt_logprobs", None),
        skip_special_tokens=opt("skip_special_tokens", True),
        include_stop_str_in_output=p.include_stop_str_in_output, n=opt("n", 1),
        logit_bias=dict(p.logit_bias),
        structured_output=_structured(p.structured_output) if p.HasField("structured_output")
        else None)
    if params.n != 1:
        raise InvalidRequestError(
            f"n={params.n}: a Generate stream carries one sample; open one stream per sample "
            "(with seeds, for reproducible ones)", param="n")
    return params


def _structured(so: pb.StructuredOutput) -> dict[str, str] | None:
    spec = _structured_spec(so)
    if spec is not None:
        check_spec(spec, "structured_output")  # here, to name this API's field
    return spec


def _structured_spec(so: pb.StructuredOutput) -> dict[str, str] | None:
    kind = so.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        if not so.json_object:
            raise InvalidRequestError("structured_output.json_object must be true when set",
                                      param="structured_output")
        return json_object_spec()
    if kind == "choice":
        return choice_spec(list(so.choice.choices), "structured_output")
    return {"type": {"json_schema": "json"}.get(kind, kind), "value": getattr(so, kind)}


def _messages(msgs) -> list[dict]:
    out = []
    for m in msgs:
        d = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                               for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    try:
        return template_messages(out)
    except InvalidRequestError as e:
        raise _grpc_fields(e) from None


def _grpc_fields(e: InvalidRequestError) -> InvalidRequestError:
    """An error of splitserve.cluster.api.tool_calls naming this API's fields: a Tool or a
    ToolCall has no "function" level (``tools[0].name``, not
    ``tools[0].function.name``)."""
    return InvalidRequestError(str(e).replace(".function", ""), param=(e.param or "").replace(".function", ""))


def _tool_list(pb_tools) -> list[dict]:
    """Tools in OpenAI's form (what chat templates and splitserve.cluster.api.tool_calls take)."""
    tools = []
    for i, t in enumerate(pb_tools):
        fn = {"name": t.name, **({"description": t.description} if t.description else {})}
        if t.parameters:
            try:
                fn["parameters"] = json.loads(t.parameters)
            except (ValueError, RecursionError):
                raise InvalidRequestError(f"tools[{i}].parameters is not valid JSON",
                                          param=f"tools[{i}].parameters") from None
        tools.append({"type": "function", "function": fn})
    return tools


def _template_tools(pb_tools) -> list[dict]:
    """Checked tools for rendering a chat (Tokenize)."""
    try:
        return tool_request(_tool_list(pb_tools), "none", None, None).tools
    except InvalidRequestError as e:
        raise _grpc_fields(e) from None


def _tools(req: pb.GenerateRequest, chat_template: str | None,
           parser: str = "auto") -> ToolRequest | None:
    """The request's tool calling (splitserve.cluster.api.tool_calls), errors naming this
    API's fields."""
    if not req.messages and (req.tools or req.tool_choice or req.tool_function):
        raise InvalidRequestError("tools need a chat (messages)", param="tools")
    tools = _tool_list(req.tools)
    if req.tool_choice and req.tool_function:
        raise InvalidRequestError("set tool_choice or tool_function, not both", param="tool_function")
    choice = ({"type": "function", "function": {"name": req.tool_function}} if req.tool_function
              else req.tool_choice or None)
    parallel = req.parallel_tool_calls if req.HasField("parallel_tool_calls") else None
    try:
        return tool_request(tools or None, choice, parallel, chat_template, parser)
    except InvalidRequestError as e:
        e = _grpc_fields(e)
        if req.tool_function and e.param == "tool_choice":
            e = InvalidRequestError(str(e), param="tool_function")
        raise e from None


def _response(out: dict, request_id: str, timings: dict[str, float] | None,
              calls: ToolCalls | None = None) -> pb.GenerateResponse:
    text, reason = out["text"], out["finish_reason"]
    deltas: list[dict] = []
    if calls is not None:
        text, deltas, reason = calls.step(text, out["finished"], reason)
    r = pb.GenerateResponse(
        request_id=request_id, token_ids=out["token_ids"], text=text,
        finish_reason=(reason or "") if out["finished"] else "",
        usage=pb.Usage(prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                       cached_tokens=out["cached_tokens"]))
    for d in deltas:
        fn = d["function"]
        r.tool_calls.add(index=d["index"], id=d.get("id", ""), name=fn.get("name", ""),
                         arguments=fn.get("arguments", ""))
    for lp in out.get("logprobs") or ():
        _add_logprob(r.logprobs, lp)
    for lp in (out.get("prompt_logprobs") or [None])[1:]:
        _add_logprob(r.prompt_logprobs, lp)
    if timings is not None:
        r.timings.update(timings)
    return r


def _add_logprob(field, lp: dict) -> None:
    field.add(token_id=lp["token_id"], logprob=lp["logprob"],
              top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp["top"]])


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, backend: Backend):
        self.backend = backend

    def _prompt_ids(self, req: pb.GenerateRequest, tools: ToolRequest | None) -> list[int]:
        tokenizer = self.backend.tokenizer(req.model)
        which = req.WhichOneof("prompt")
        if req.messages:
            if which is not None:
                raise InvalidRequestError("send either a prompt or messages, not both", param="messages")
            text = tokenizer.apply_chat_template(_messages(req.messages),
                                                 tools=tools.tools if tools else None)
            return tokenizer.encode(text, add_special_tokens=False)  # the template wrote BOS
        if which == "text":
            if not req.text:
                raise InvalidRequestError("the prompt text is empty", param="prompt")
            return tokenizer.encode(req.text)
        if which == "token_ids":
            return list(req.token_ids.ids)
        raise InvalidRequestError("a prompt (text or token_ids) or messages is required", param="prompt")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        try:
            tools = _tools(request, self.backend.tokenizer(request.model).chat_template,
                           self.backend.tool_call_parser(request.model))
            ids = self._prompt_ids(request, tools)
            params = sampling_params(request.params)
            if tools is not None:
                params = tools.sampling(params)
            try:
                self.backend.validate(request.model, ids, params)
            except InvalidRequestError as e:
                if request.messages and e.param == "prompt":
                    raise InvalidRequestError(str(e), param="messages") from None
                raise
        except Exception as e:  # noqa: BLE001 - every refusal becomes a status
            await _abort(context, e)
        # The backend id is always fresh: a client's request_id may repeat.
        backend_id = f"grpc-{uuid.uuid4().hex}"
        request_id = request.request_id or backend_id
        prepare_s = time.perf_counter() - t0
        stream = self.backend.generate(request.model, backend_id, ids, params)
        calls = tools.calls() if tools is not None else None
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
                yield _response(out, request_id, timings, calls)
        except Exception as e:  # noqa: BLE001 - reported as the call's status below
            failure = e
        finally:
            await stream.aclose()
        if failure is not None:
            await _abort(context, failure)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            tokenizer = self.backend.tokenizer(request.model)
            info = next(m for m in self.backend.models() if m.name == request.model)
            if request.messages:
                if request.text:
                    raise InvalidRequestError("send either text or messages, not both", param="messages")
                tools = _template_tools(request.tools) if request.tools else None
                prompt = tokenizer.apply_chat_template(_messages(request.messages), tools=tools)
                ids = tokenizer.encode(prompt, add_special_tokens=False)
            else:
                if request.tools:
                    raise InvalidRequestError("tools need a chat (messages)", param="tools")
                prompt = ""
                add = request.add_special_tokens if request.HasField("add_special_tokens") else True
                ids = tokenizer.encode(request.text, add_special_tokens=add)
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
        return pb.TokenizeResponse(token_ids=ids, prompt=prompt, max_model_len=info.max_model_len)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelCard(name=m.name, max_model_len=m.max_model_len, created=m.created)
            for m in self.backend.models()])


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: "" (the server) and the Generation service are
    SERVING until ``set_serving(False)`` (e.g. while draining; call it on
    the server's event loop)."""

    def __init__(self):
        self._serving = True
        self._changed = asyncio.Event()

    def set_serving(self, serving: bool) -> None:
        self._serving = serving
        self._changed.set()
        self._changed = asyncio.Event()

    def _status(self, service: str) -> int | None:
        if service not in ("", SERVICE_NAME):
            return None
        return _Serving.SERVING if self._serving else _Serving.NOT_SERVING

    async def Check(self, request, context) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:100]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        last = None
        while True:  # until the client cancels
            changed = self._changed  # taken before the status: no change slips between
            status = self._status(request.service)
            status = _Serving.SERVICE_UNKNOWN if status is None else status
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await changed.wait()


def _key_ok(metadata, keys: list[bytes]) -> bool:
    given = []
    for key, value in metadata or ():
        if key == "authorization" and value[:7].lower() == "bearer ":
            given.append(value[7:].strip())
        elif key == "x-api-key":
            given.append(value.strip())
    ok = False
    for g in given:  # no early exit: the time taken does not tell which value was a key
        ok |= secret_matches(g, *keys)
    return ok


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every method, health included, without a configured key."""

    def __init__(self, api_keys: list[str]):
        self.keys = [k.encode() for k in api_keys]

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or _key_ok(details.invocation_metadata, self.keys):
            return handler

        async def deny(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key: send metadata 'authorization: Bearer "
                                "<key>' or 'x-api-key: <key>'")

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}
        return make[(handler.request_streaming, handler.response_streaming)](deny)


async def start_grpc_server(backend: Backend, host: str, port: int, api_keys: list[str],
                            tls_cert: str | None = None, tls_key: str | None = None,
                            max_message_bytes: int = 4 << 20,
                            health: HealthService | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving on ``host:port`` (0: a free port); returns the server
    and the bound port. TLS when both certificate and key (PEM files) are
    given. Pass ``health`` to report NOT_SERVING (``set_serving(False)``)
    while draining. Stop with ``await server.stop(grace)``."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both grpc_tls_cert and grpc_tls_key (PEM files), or neither")
    server = grpc.aio.server(
        interceptors=[_ApiKeyInterceptor(api_keys)] if api_keys else None,
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes)])
    pb_grpc.add_GenerationServicer_to_server(GenerationService(backend), server)
    health_pb2_grpc.add_HealthServicer_to_server(health or HealthService(), server)
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
