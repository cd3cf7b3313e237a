"""The seam between the client APIs (HTTP, gRPC) and whatever generates.

``Backend`` is what both ingresses call. ``LocalBackend`` runs colocated
engines in this process (the single-process mode, and the reference the
cluster is compared with); ``splitserve.cluster.serve.orchestrator.ClusterBackend`` places each
request on a prefill/decode pair through the router. Both yield the same
output dicts (``splitserve.engine.outputs.RequestOutput.to_dict``):

  {request_id, token_ids, text, finished, finish_reason, prompt_tokens,
   completion_tokens, cached_tokens, logprobs?, timings?}

The ingresses call ``tokenizer``, ``tool_call_parser``, ``reasoning_parser``
and ``validate`` from
their preparation threads (splitserve.cluster.api.prepare), not from the
event loop: these must be thread-safe and must not touch the loop.

A request's ``model`` may name a LoRA adapter (``AdapterRegistry``):
each backend resolves it in its one model lookup (``_resolve``), to the
base model it runs on and the adapter; ``models()`` lists adapters with
their ``parent``. ``load_adapter`` / ``unload_adapter`` change the served
adapters at run time.

``readiness`` (for /ready and the gRPC health service) and
``cluster_metrics`` (for /metrics) run on the event loop; the base class's
versions know of no replicas: always ready, no replica metrics.
"""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from splitserve.cluster.api.adapter_registry import AdapterRegistry, BaseFacts, ServedAdapter
from splitserve.cluster.api.errors import DeadlineExceeded, Overloaded, Unavailable  # noqa: F401
from splitserve.engine.errors import AdapterError, SplitserveError
from splitserve.engine.lora.adapter import AdapterRef
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tokenizer import Tokenizer
from splitserve.engine.roles import Role
from splitserve.engine.stats import DecodeStats
from splitserve.router.reports import ReplicaInfo, StatsReport


class UnknownModel(SplitserveError, LookupError):
    def __init__(self, model: str, known: list[str]):
        super().__init__(f"model {model!r} is not served here; available: {', '.join(known)}")
        self.model = model


@dataclass(frozen=True)
class RequestOptions:
    """How a request is scheduled, besides what it samples (the client APIs
    read these: ``splitserve.cluster.api.request_options``)."""

    priority: int = 0
    """Its place in the router's queue: lower first (vLLM's ``priority``),
    equal priorities in arrival order."""
    deadline: float | None = None
    """Wall-clock seconds (``time.time()``) by which the request must end
    (its client's timeout): it waits for a replica at most until then (and
    at most ``router.max_queue_delay_s``), and a stream still running then
    is cancelled (DeadlineExceeded). None: only the cluster's deadlines."""
    choices: tuple[str, int] | None = None
    """(key, count) when the request is ``count`` backend requests (its n
    choices, per prompt) generated side by side: they are admitted all or
    none (a 429 before any streams). None: one backend request."""


DEFAULT_OPTIONS = RequestOptions()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    created: int
    parent: str | None = None  # a LoRA adapter's base model; None for a base model
    # the model's vocabulary (its logits' width), which may exceed its tokenizer's
    # (padded embeddings); 0 where unknown: the tokenizer's then bounds token ids
    vocab_size: int = 0


@dataclass(frozen=True)
class PoolReadiness:
    model: str
    pool: str  # a Role value: prefill, decode or colocated
    live_replicas: int  # healthy, not draining, stats younger than the router's TTL
    required: bool = True  # False: requests are served without it (a prefill pool:
    # with none live, decode replicas prefill themselves)
    wanted: bool = True  # the pool's min_replicas is above 0: none live is a loss
    # (its node gone) the operator must see, though requests are still served


@dataclass(frozen=True)
class Readiness:
    """Whether every model can be served: a live replica in each required pool
    and nothing else in the way (``problems``)."""

    pools: tuple[PoolReadiness, ...] = ()
    error: str = ""  # why the replicas could not be learned (the router is down)
    problems: tuple[str, ...] = ()  # other reasons the API would not answer every
    # model: a model missing from the ingress' table or its router's config, an
    # ingress rollout under way

    @property
    def missing(self) -> list[PoolReadiness]:
        return [p for p in self.pools if p.required and p.live_replicas == 0]

    @property
    def degraded(self) -> list[PoolReadiness]:
        """Pools with no live replica that requests are served without, though
        the configuration asks for one (a prefill pool whose node was lost)."""
        return [p for p in self.pools if not p.required and p.wanted and p.live_replicas == 0]

    @property
    def ready(self) -> bool:
        return not self.error and not self.missing and not self.problems

    def reason(self) -> str:
        if self.error:
            return self.error
        return "; ".join([*self.problems, *(f"model {p.model!r} has no live {p.pool} replica"
                                            for p in self.missing)])

    def to_dict(self) -> dict[str, Any]:
        """The /ready body: status, every pool's live replica count, what is missing."""
        models: dict[str, dict[str, int]] = {}
        for p in self.pools:
            models.setdefault(p.model, {})[p.pool] = p.live_replicas
        out: dict[str, Any] = {"status": "ready" if self.ready else "not_ready", "models": models}
        if not self.ready:
            out["reason"] = self.reason()
            out["missing"] = [{"model": p.model, "pool": p.pool} for p in self.missing]
        if self.degraded:
            out["degraded"] = [{"model": p.model, "pool": p.pool,
                                "reason": f"no live {p.pool} replica; its decode replicas "
                                          "prefill its prompts"} for p in self.degraded]
        return out


@dataclass(frozen=True)
class ClusterMetrics:
    """What /metrics shows besides the ingress's own request metrics."""

    reports: tuple[StatsReport, ...] = ()  # each live replica's latest stats
    router_text: str = ""  # the router's metrics, Prometheus text format
    errors: tuple[str, ...] = field(default=())  # sources that could not be read


class Backend(abc.ABC):
    # the LoRA adapters served, by name (None: this backend serves none)
    adapter_registry: AdapterRegistry | None = None

    _routing = None

    @property
    def routing(self):
        """The routes this backend's ingress serves
        (``splitserve.cluster.api.routing.Routing``); by default none."""
        if self._routing is None:
            from splitserve.cluster.api.routing import Routing

            self._routing = Routing(served={m.name for m in self.models()})
        return self._routing

    @routing.setter
    def routing(self, value) -> None:
        self._routing = value

    @abc.abstractmethod
    def models(self) -> list[ModelInfo]:
        """Served models, in config order, then adapters (``with_adapters``)."""

    def with_adapters(self, bases: list[ModelInfo]) -> list[ModelInfo]:
        """``bases`` followed by the served adapters' cards (with ``parent``)."""
        if self.adapter_registry is None:
            return bases
        base = {m.name: m for m in bases}
        return bases + [ModelInfo(a.ref.name, base[a.base].max_model_len, a.created, a.base,
                                  base[a.base].vocab_size)
                        for a in self.adapter_registry.adapters()]

    def model_info(self, model: str) -> ModelInfo:
        """The served model's (or adapter's) card; raises UnknownModel."""
        served = self.models()
        for m in served:
            if m.name == model:
                return m
        raise UnknownModel(model, [m.name for m in served])

    def resolve_adapter(self, model: str) -> ServedAdapter | None:
        """The adapter served as ``model``; None when it names none (a
        base model, or nothing). Backends call it in their model lookup."""
        reg = self.adapter_registry
        return None if reg is None else reg.get(model)

    async def load_adapter(self, name: str, path: str, base_model: str | None = None,
                           replace: bool = False) -> ModelInfo:
        """Serve the PEFT adapter at ``path`` as ``name`` on ``base_model``
        (None: the only model that serves adapters). Raises AdapterError
        (400: unreadable, unserved features, does not fit the model) or
        AdapterConflict (409: the name is taken and ``replace`` is off)."""
        reg = self._registry()
        served = await asyncio.to_thread(reg.check, name, path, base_model)  # reads files
        reg.add(served, replace)
        self.adapter_loaded(served)
        return self.model_info(name)

    async def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name`` (requests running with it finish;
        new ones get 404). Raises UnknownAdapter (404)."""
        served = self._registry().remove(name)
        self.adapter_unloaded(served)

    def adapter_loaded(self, served: ServedAdapter) -> None:
        """Hook: ``served`` was registered (persist it, warm replicas)."""

    def adapter_unloaded(self, served: ServedAdapter) -> None:
        """Hook: ``served`` was unregistered."""

    def _registry(self) -> AdapterRegistry:
        if self.adapter_registry is None:
            raise AdapterError("this server serves no LoRA adapters", param="lora_name")
        return self.adapter_registry

    @abc.abstractmethod
    def tokenizer(self, model: str) -> Tokenizer:
        """The model's tokenizer; raises UnknownModel."""

    @abc.abstractmethod
    def validate(self, model: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError (with ``param``) or UnknownModel before
        any work starts; called by ingresses so bad input fails fast."""

    @abc.abstractmethod
    def generate(self, model: str, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams,
                 options: RequestOptions = DEFAULT_OPTIONS) -> AsyncIterator[dict]:
        """Stream output dicts; ``options``: priority and the client's
        deadline. Raises UnknownModel, InvalidRequestError,
        Overloaded, Unavailable or DeadlineExceeded (RequestFailedError:
        the request failed on the server). Closing the iterator cancels the request
        everywhere and frees its KV blocks."""

    def tool_call_parser(self, model: str) -> str:
        """The model's tool-call format (splitserve.cluster.api.tool_calls.PARSER_NAMES);
        auto: detected from its chat template."""
        return "auto"

    async def readiness(self) -> Readiness:
        """Live replicas per model and pool; never raises (an unreachable
        router is ``Readiness(error=...)``)."""
        return Readiness()

    async def cluster_metrics(self) -> ClusterMetrics:
        """The replicas' latest stats and the router's metrics; never raises
        (a source that cannot be read is named in ``errors``)."""
        return ClusterMetrics()

    def reasoning_parser(self, model: str) -> str:
        """The model's reasoning format (splitserve.cluster.api.reasoning.PARSER_NAMES);
        auto: detected from its chat template."""
        return "auto"

    async def close(self) -> None:
        pass


class LocalBackend(Backend):
    """Colocated engines in this process, one per model."""

    def __init__(self, engines: dict, tool_call_parsers: dict[str, str] | None = None,
                 reasoning_parsers: dict[str, str] | None = None):
        from splitserve.cluster.observability.metrics import RequestRecorder
        from splitserve.engine.async_engine import AsyncEngine

        self._recorder = RequestRecorder  # imported here: metrics imports this module

        self._engines = dict(engines)
        self._parsers = dict(tool_call_parsers or {})
        self._reasoning = dict(reasoning_parsers or {})
        self._async = {n: AsyncEngine(e, name=f"engine-{n}").start() for n, e in engines.items()}
        self._created = int(time.time())
        self.adapter_registry = AdapterRegistry({
            n: BaseFacts(e.model_cfg, e.cfg.max_loras, e.cfg.max_lora_rank)
            for n, e in engines.items()})

    def _resolve(self, model: str) -> tuple[str, AdapterRef | None]:
        """(the engine's model name, the adapter) that ``model`` names."""
        if model in self._engines:
            return model, None
        served = self.resolve_adapter(model)
        if served is None:
            raise UnknownModel(model, [m.name for m in self.models()])
        return served.base, served.ref

    def _engine(self, model: str):
        return self._engines[self._resolve(model)[0]]

    def models(self) -> list[ModelInfo]:
        return self.with_adapters([ModelInfo(n, e.max_model_len, self._created,
                                             vocab_size=e.model_cfg.vocab_size)
                                   for n, e in self._engines.items()])

    def tokenizer(self, model: str) -> Tokenizer:
        return self._engine(model).tokenizer

    def tool_call_parser(self, model: str) -> str:
        return self._parsers.get(self._resolve(model)[0], "auto")

    def reasoning_parser(self, model: str) -> str:
        return self._reasoning.get(self._resolve(model)[0], "auto")

    def validate(self, model, prompt_token_ids, params) -> None:
        self._engine(model).validate(prompt_token_ids, params)

    async def generate(self, model, request_id, prompt_token_ids, params,
                       options: RequestOptions = DEFAULT_OPTIONS):
        """The engine serves its requests in arrival order (no router queue:
        ``options.priority`` does not apply); ``options.deadline`` cancels
        the request when it passes."""
        from splitserve.engine.async_engine import EngineDeadError

        base, adapter = self._resolve(model)
        rec = self._recorder(model)  # an adapter's requests under its own name
        error: BaseException | None = None
        stream = self._async[base].generate(request_id, prompt_token_ids, params, adapter=adapter)
        try:
            while True:
                # the deadline bounds each wait for the engine, never the
                # caller's time between outputs
                limit = None if options.deadline is None else options.deadline - time.time()
                try:
                    async with asyncio.timeout(None if limit is None else max(0.0, limit)):
                        out = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    error = DeadlineExceeded(f"request {request_id} passed its deadline (the "
                                             "client's timeout); cancelled")
                    raise error from None
                d = out.to_dict()
                rec.on_output(d)
                yield d
        except EngineDeadError as e:
            error = Unavailable(f"the engine for {base!r} is not running: {e}")
            raise error from None
        except BaseException as e:
            error = error or e
            raise
        finally:
            await stream.aclose()
            rec.finish(error)

    async def readiness(self) -> Readiness:
        return Readiness(tuple(PoolReadiness(n, Role.COLOCATED.value, int(a.alive))
                               for n, a in self._async.items()))

    async def cluster_metrics(self) -> ClusterMetrics:
        """Each engine as a colocated replica ``local:<model>``."""
        reports, errors = [], []
        for name, a in self._async.items():
            try:
                load = await a.call(lambda e: e.load_stats())
            except Exception as e:  # noqa: BLE001 - a dead engine has no stats
                errors.append(f"engine {name!r}: {e}")
                continue
            stats = DecodeStats(engine=load, streams=a.num_streams, reservations=0, handoffs=0,
                                local_prefills=0, fallbacks=0, refused=0, expired=0,
                                handoff_bytes=0, kv_endpoint="")
            info = ReplicaInfo(replica_id=f"local:{name}", role=Role.COLOCATED, model=name,
                               kv_endpoint="", node_id="")
            reports.append(StatsReport(replica=info, stats=stats, healthy=a.alive, draining=False,
                                       updated_at=time.time(), stored=(), evicted=(),
                                       snapshot=False))
        return ClusterMetrics(tuple(reports), errors=tuple(errors))

    async def close(self) -> None:
        for a in self._async.values():
            a.stop()

    def all_blocks_free(self) -> bool:
        return all(e.kv.all_free() for e in self._engines.values())
