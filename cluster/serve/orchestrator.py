"""ClusterBackend: places each request on a (prefill, decode) pair and
streams its tokens back, surviving refusals and replica deaths.

Per request: the router admits it (an admission slot leased to this
ingress, ``splitserve.cluster.serve.router_client``), queues it while no
replica can take it, and picks a pair; the decode replica's Generate
stream carries the tokens. The slot is taken before the first await and
given back on every path (finished, failed, refused, cancelled while it
waited), with the output length when it finished. A refusal
before the first token (the decode replica is full, or died) moves the
request to another pair. If a decode replica dies mid-stream, the request
resumes on another one by prefilling prompt + tokens generated so far, so
the client sees neither lost nor duplicated tokens. Those tokens travel
marked as earlier output (``SamplingParams.resumed_tokens``): seeds,
penalties and a structured-output grammar carry on where they were.

A failure that may be the request's own doing moves it to another replica
at most once, a replica that stops answering as often as
``router.max_retries`` allows (``splitserve.cluster.serve.retry_policy``
decides which failures move a request and where not). Every stream runs
under the ``deadlines`` of the config (``stream_deadlines``); past one, the
request is cancelled on the workers and fails with DeadlineExceeded.

Traced (a tracer given, and the API put the request's span in
``splitserve.cluster.observability.tracing.ingress_span``): the request's
model, id and token counts go on that span, each placement attempt is a
``route`` span whose traceparent the router gets, and the decode replica's
Generate call carries the request span's traceparent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import msgspec

from splitserve.cluster.api.adapter_registry import AdapterRegistry, BaseFacts
from splitserve.cluster.api.backend import (
    DEFAULT_OPTIONS,
    Backend,
    ClusterMetrics,
    DeadlineExceeded,
    ModelInfo,
    Overloaded,
    Readiness,
    RequestOptions,
    Unavailable,
    UnknownModel,
)
from splitserve.cluster.api.health import cluster_readiness
from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.serve.adapter_store import AdapterStore, AdapterSync
from splitserve.cluster.serve.checkpoints import chat_template_override, checkpoint_dir
from splitserve.cluster.serve.route_client import RouteClient
from splitserve.cluster.serve.retry_policy import MAX_FAULT_RESUMES, Attempts, is_request_fault
from splitserve.cluster.serve.router_client import RouterClient, RouterUnavailableError
from splitserve.cluster.observability.metrics import RequestRecorder, record_retry
from splitserve.cluster.observability.tracing import ingress_span
from splitserve.cluster.serve.stream_deadlines import StreamDeadlines
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.hashing import block_hashes
from splitserve.engine.lora.adapter import AdapterRef
from splitserve.handoff.messages import Adapter, GenerateRequest, PrefillPlacement
from splitserve.handoff.rpc import RpcError, WorkerClients
from splitserve.handoff.tracing import (ATTR_DECODE_REPLICA, ATTR_FINISH_REASON, ATTR_MODEL,
                                        ATTR_OUTPUT_TOKENS, ATTR_PREFILL_REPLICA,
                                        ATTR_PROMPT_TOKENS, ATTR_REQUEST_ID, SPAN_ROUTE, Span,
                                        Tracer)
from splitserve.engine.sampling_params import SamplingParams, validate_request
from splitserve.engine.tokenizer import Tokenizer
from splitserve.router.types import (
    NeverFitsError,
    OverloadedError,
    Placement,
    QueueDelayError,
    RouteRefusal,
    RouteRequest,
    RouterError,
    UnknownModelError,
)

log = logging.getLogger("splitserve.client")
ROUTER_QUERY_S = 2.0  # /ready and /metrics wait this long for the router
ADAPTER_SYNC_S = 1.0  # an adapter loaded or unloaded through another ingress, within this
# retry_policy's two names stay importable from here
__all__ = ["ClusterBackend", "ROUTER_QUERY_S", "ADAPTER_SYNC_S", "MAX_FAULT_RESUMES",
           "is_request_fault"]

@dataclasses.dataclass
class _Model:
    name: str
    tokenizer: Tokenizer
    block_size: int
    max_model_len: int
    vocab_size: int
    tool_call_parser: str = "auto"
    reasoning_parser: str = "auto"


class ClusterBackend(Backend):
    def __init__(self, cfg: ClusterConfig, router: RouterClient | None = None,
                 token: str | None = None, tracer: Tracer | None = None,
                 rollout_problems: Callable[[], Awaitable[Sequence[str]]] | None = None,
                 adapter_store: AdapterStore | None = None):
        """``rollout_problems``: why this ingress replica must not say it is
        ready beyond the pools (``splitserve.cluster.serve.rollout``);
        ``adapter_store``: where runtime-loaded adapters are kept for every
        ingress (``splitserve.cluster.serve.adapter_store``)."""
        from splitserve.engine.loader import load_checkpoint

        self.cfg = cfg
        self.tracer = tracer
        self.token = token or cfg.cluster_token()
        if not self.token:
            raise ValueError("ClusterBackend needs the cluster token: pass token= (inside a "
                             "cluster: splitserve.cluster.serve.secrets.cluster_token())")
        self._router = router
        self._rollout_problems = rollout_problems
        tls = cfg.transfer.tls
        self._tls = None if tls is None else tls.load()  # worker RPCs and router streams
        self._clients = WorkerClients(self.token, self._tls)
        self._models: dict[str, _Model] = {}
        bases: dict[str, BaseFacts] = {}
        for served in cfg.models:
            spec = served.model
            path = checkpoint_dir(spec)
            mc = load_checkpoint(path).model_config
            limit = min(spec.max_model_len or mc.max_position, mc.max_position)
            tokenizer = Tokenizer.from_dir(path)
            template = chat_template_override(spec)
            if template is not None:
                tokenizer.chat_template = template
            self._models[spec.name] = _Model(spec.name, tokenizer, spec.block_size,
                                             limit, mc.vocab_size, spec.tool_call_parser,
                                             spec.reasoning_parser)
            bases[spec.name] = BaseFacts(mc, spec.max_loras, spec.max_lora_rank)
        # the operator's adapters, checked against their models now: a bad one fails the start
        self.adapter_registry = AdapterRegistry(bases)
        for served in cfg.models:
            for a in served.model.adapters:
                self.adapter_registry.load(a.name, a.path, served.model.name)
        # runtime-loaded adapters: shared with every ingress through the store
        # (``start`` reads them); without one, this backend's own
        self.adapter_sync = None if adapter_store is None else AdapterSync(
            self.adapter_registry, {a.ref.name for a in self.adapter_registry.adapters()},
            adapter_store, ADAPTER_SYNC_S)
        self._created = int(time.time())
        # at least twice a second: a hot edit of a route's weights is in force this soon
        self.routing = RouteClient.for_config(cfg, min(0.5, cfg.router.stats_period_s))
        self.counters = {"retries": 0, "resumed": 0, "refused": 0, "faults": 0, "failed": 0,
                         "deadlines": 0}

    async def start(self) -> None:
        """Serve the routes' weights and the stored adapters, and follow both."""
        await self.routing.start()
        if self.adapter_sync is not None:
            await self.adapter_sync.start()

    async def load_adapter(self, name: str, path: str, base_model: str | None = None,
                           replace: bool = False) -> ModelInfo:
        if self.adapter_sync is None:
            return await super().load_adapter(name, path, base_model, replace)
        served = await asyncio.to_thread(self.adapter_registry.check, name, path, base_model)
        await self.adapter_sync.load(served, replace)
        return self.model_info(name)

    async def unload_adapter(self, name: str) -> None:
        if self.adapter_sync is None:
            return await super().unload_adapter(name)
        await self.adapter_sync.unload(name)

    @property
    def router(self) -> RouterClient:
        if self._router is None:
            spec = self.cfg.router
            self._router = RouterClient(spec.routers, heartbeat_s=spec.stats_period_s,
                                        models=[s.model.name for s in self.cfg.models],
                                        tls=self._tls, no_router_wait_s=spec.no_router_grace_s)
        return self._router

    def _resolve(self, name: str) -> tuple[_Model, AdapterRef | None]:
        """The model lookup: the served base model ``name`` names, and the
        LoRA adapter when it names one (``AdapterRegistry``)."""
        m = self._models.get(name)
        if m is not None:
            return m, None
        served = self.resolve_adapter(name)
        if served is None:
            raise UnknownModel(name, [i.name for i in self.models()])
        return self._models[served.base], served.ref

    def _model(self, name: str) -> _Model:
        return self._resolve(name)[0]

    def models(self) -> list[ModelInfo]:
        return self.with_adapters([ModelInfo(m.name, m.max_model_len, self._created,
                                             vocab_size=m.vocab_size)
                                   for m in self._models.values()])

    def tokenizer(self, model: str) -> Tokenizer:
        return self._model(model).tokenizer

    def tool_call_parser(self, model: str) -> str:
        return self._model(model).tool_call_parser

    def reasoning_parser(self, model: str) -> str:
        return self._model(model).reasoning_parser

    def validate(self, model: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        m = self._model(model)
        validate_request(prompt_token_ids, params, m.max_model_len, m.vocab_size)

    async def _route(self, lease: str, req: RouteRequest, admitted: bool,
                     arrival: float, options: RequestOptions,
                     trace: Span | None = None, resumed: bool = False) -> Placement:
        if trace is None:
            return await self._place(lease, req, admitted, arrival, options, None, resumed)
        span = self.tracer.start(SPAN_ROUTE, trace.traceparent, attributes={
            ATTR_REQUEST_ID: req.request_id, "splitserve.excluded": len(req.exclude_replicas)})
        try:
            p = await self._place(lease, req, admitted, arrival, options, span.traceparent,
                                  resumed)
        except BaseException as e:
            span.fail(e)
            raise
        else:
            span.set(ATTR_PREFILL_REPLICA, p.prefill_replica or "")
            span.set(ATTR_DECODE_REPLICA, p.decode_replica)
            span.set("splitserve.placement_reason", p.reason)
            return p
        finally:
            span.end()

    async def _place(self, lease: str, req: RouteRequest, admitted: bool,
                     arrival: float, options: RequestOptions,
                     traceparent: str | None, resumed: bool = False) -> Placement:
        """``resumed``: the stream produced tokens before its decode replica
        failed; the router queues it ahead of new requests, bounded by
        ``router.max_resume_wait_s`` instead of ``max_queue_delay_s``. A
        request's choices (``options.choices``) first ask together: all
        admitted, or all refused."""
        try:
            return await self.router.place(lease, req, arrival=arrival, admitted=admitted,
                                           deadline=options.deadline, priority=options.priority,
                                           traceparent=traceparent, resumed=resumed,
                                           group=None if admitted else options.choices)
        except RouterUnavailableError as e:
            raise Unavailable(f"the router is unavailable: {e}", 1.0) from None
        except RouterError as e:
            raise self._refused(e) from None

    def _refused(self, e: RouteRefusal) -> Exception:
        """The client-facing error of the router's refusal."""
        if isinstance(e, NeverFitsError):  # no wait or retry helps: the client's to change
            return InvalidRequestError(str(e), param="max_tokens")
        if isinstance(e, (OverloadedError, QueueDelayError)):
            return Overloaded(str(e), e.retry_after_s)
        if isinstance(e, UnknownModelError):
            return UnknownModel(e.model, list(self._models))
        return Unavailable(str(e), e.retry_after_s)  # NoCapacityError

    async def generate(self, model: str, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams,
                       options: RequestOptions = DEFAULT_OPTIONS) -> AsyncIterator[dict]:
        """``options``: the request's priority in its model's router queue,
        and its own deadline, which bounds its wait there (with
        ``router.max_queue_delay_s``) and its streams (with ``deadlines``)."""
        try:
            m, adapter = self._resolve(model)
            self.validate(model, prompt_token_ids, params)
        except BaseException:
            if options.choices is not None:
                self.router.withdraw(options.choices)  # its sibling choices go without it
            raise
        root = adapter.hash_root if adapter is not None else 0
        produced: list[int] = []
        first_cached: int | None = None  # the prompt's cached tokens, as first reported
        lease, arrival, finished_with = self.router.new_lease(), time.time(), -1
        admitted = asked = False  # asked: its first placement call was made
        tries = Attempts(request_id, self.cfg.router.max_retries + 1, self.counters)
        deadlines = StreamDeadlines(
            self.cfg.deadlines, request_id,
            params.max_tokens or m.max_model_len - len(prompt_token_ids),
            deadline=options.deadline)
        rec = RequestRecorder(model)  # an adapter's requests under its own name
        error: BaseException | None = None
        trace = ingress_span() if self.tracer is not None else None
        if trace is not None:
            trace.set(ATTR_MODEL, model)
            trace.set(ATTR_REQUEST_ID, request_id)
            trace.set(ATTR_PROMPT_TOKENS, len(prompt_token_ids))
        try:
            while True:
                ids = list(prompt_token_ids) + produced
                p = params if not produced else dataclasses.replace(
                    params, max_tokens=(params.max_tokens - len(produced))
                    if params.max_tokens is not None else None,
                    min_tokens=max(0, params.min_tokens - len(produced)),
                    resumed_tokens=params.resumed_tokens + len(produced),
                    prompt_logprobs=None)  # delivered with the first output
                req = RouteRequest(
                    request_id=f"{request_id}-{len(produced)}-{tries.left}", model=m.name,
                    prompt_len=len(ids), max_tokens=p.max_tokens or 1,
                    # a scored prompt is computed whole: no replica's cache helps it;
                    # an adapter's prompt matches only blocks cached under it
                    block_hashes=tuple(block_hashes(ids, m.block_size, root=root))
                    if p.prompt_logprobs is None else (),
                    exclude_replicas=frozenset(tries.exclude),
                    refused_by=frozenset(tries.refused),
                    adapter=adapter.key if adapter is not None else None)
                asked = True
                placement = await self._route(lease, req, admitted, arrival, options, trace,
                                              resumed=bool(produced))
                admitted = True
                decode = placement.decode_replica
                prefill = placement.prefill_replica
                body = GenerateRequest(
                    request_id=request_id, prompt_token_ids=ids, params=p.to_dict(),
                    prefill=PrefillPlacement(address=prefill) if prefill else None,
                    adapter=Adapter.of(adapter),
                    traceparent=None if trace is None else trace.traceparent)
                before = len(produced)
                stream = self._clients.get(decode).generate(body, timeout=deadlines.remaining())
                try:
                    async with contextlib.aclosing(deadlines.outputs(stream, decode)) as outs:
                        async for out in outs:
                            if first_cached is None:
                                first_cached = out.cached_tokens
                            if produced:  # usage is the client's view: the original prompt
                                out.prompt_tokens = len(prompt_token_ids)
                                out.completion_tokens = len(produced) + len(out.token_ids)
                                # a resumed stream's replica counts the earlier output
                                # among its cached tokens; the prompt's are as first told
                                out.cached_tokens = first_cached
                            produced.extend(out.token_ids)
                            d = msgspec.to_builtins(out)  # the Backend's output dict
                            d["placement"] = {"prefill": prefill, "decode": decode,
                                              "reason": placement.reason}
                            rec.on_output(d)
                            yield d
                            if out.finished:
                                finished_with = len(produced)
                                if trace is not None and out.finish_reason is not None:
                                    trace.set(ATTR_FINISH_REASON, [out.finish_reason.value])
                                return
                    raise Unavailable(f"decode replica {decode} ended the stream early")
                except DeadlineExceeded:
                    self.counters["deadlines"] += 1
                    raise
                except RpcError as e:
                    if isinstance(e, InvalidRequestError):  # the worker refused the request
                        raise InvalidRequestError(e.message, param=e.param) from None
                    if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        self.counters["deadlines"] += 1
                        if e.kind is None:  # this call's own (overall) deadline
                            raise deadlines.expired(decode) from None
                        raise DeadlineExceeded(
                            f"request {request_id} timed out on {decode}: {e.message}") from None
                    tries.after_failure(e, decode, produced_here=len(produced) > before)
                    if e.code == grpc.StatusCode.UNAVAILABLE:
                        self.router.suspect(decode)
                    if len(produced) > before or produced:
                        self.counters["resumed"] += 1
                    else:
                        self.counters["retries"] += 1
                    record_retry(model, resumed=bool(produced))
                    log.warning("request %s: %s on %s, placing again", request_id, e.code.name, decode)
        except BaseException as e:
            error = e
            if trace is not None and not isinstance(
                    e, (GeneratorExit, asyncio.CancelledError, InvalidRequestError)):
                trace.fail(e)  # a refusal or a failure; not the client's doing
            raise
        finally:
            rec.finish(error)
            self.router.release(lease, finished_with)  # never waits; no-op if refused
            if not asked and options.choices is not None:
                self.router.withdraw(options.choices)  # its sibling choices go without it
            if trace is not None:
                trace.add(ATTR_OUTPUT_TOKENS, len(produced))

    async def readiness(self) -> Readiness:
        """Ready when this ingress serves every configured model (its model
        table), each model's router (the one its requests go to) serves it
        and counts a live replica in each required pool, and no ingress
        replica of another config still takes requests."""
        problems = [f"model {s.model.name!r} is not in this ingress' model table"
                    for s in self.cfg.models if s.model.name not in self._models]
        problems += await self._rollout_problems() if self._rollout_problems is not None else []
        try:
            asked = await self.router.queries.ask_placing(
                [s.model.name for s in self.cfg.models], "live_replicas", ROUTER_QUERY_S)
        except Exception as e:  # noqa: BLE001 - the router actor is down or restarting
            return Readiness(error=f"the router is unavailable: {type(e).__name__}")
        live: dict[str, dict[str, int]] = {}
        for model, (index, counts) in asked.items():
            if model in counts:
                live[model] = counts[model]
            else:  # configured before the model was added, and not reconfigured
                problems.append(f"router {index} does not serve model {model!r}")
        return cluster_readiness(self.cfg, live, tuple(problems))

    async def cluster_metrics(self) -> ClusterMetrics:
        try:
            reports, text = await self.router.queries.ask("metrics_scrape", ROUTER_QUERY_S)
        except Exception as e:  # noqa: BLE001 - the router actor is down or restarting
            return ClusterMetrics(errors=(f"the router is unavailable: {type(e).__name__}",))
        return ClusterMetrics(tuple(reports), text)

    async def close(self) -> None:
        if self.adapter_sync is not None:
            await self.adapter_sync.close()
        await self.routing.close()
        if self._router is not None:
            await self._router.close()
        await self._clients.close()
