"""Routes at the ingress: which served model answers a request that names a
route, and what each routed request did.

A request's ``model`` is looked up in the route table first
(``Routing.resolve``): a route picks one of its variants
(``splitserve.router.traffic.pick``: sticky by the client key, else
weighted random) and from then on the request is the variant's: tokenizer,
validation, placement and metrics all use the variant's name through the
backend's ordinary model lookup. The response echoes the name the client
asked for in ``model`` and names the variant in the ``x-splitserve-variant``
header (HTTP) or initial metadata (gRPC). The choice is made once, when the
request arrives: a stream keeps its variant whatever the weights do later.

``Routing.track`` wraps a routed request's backend stream and reports how
it ended (``VariantOutcome``: ok or a server-side error, TTFT, TPOT) to
Prometheus, labelled by route and variant, and to ``record``, which the
cluster's ``RouteClient`` sends on to the route controller (ramps). Client
errors (4xx), refusals for overload and requests the client abandoned say
nothing about a variant and are not reported as outcomes.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable

from splitserve.cluster.api.backend import ModelInfo, Overloaded, UnknownModel
from splitserve.engine.errors import InvalidRequestError
from splitserve.router.route_messages import RouteTable, RouteWeights, VariantOutcome
from splitserve.router.traffic import pick

if TYPE_CHECKING:
    from splitserve.cluster.api.backend import Backend

VARIANT_HEADER = "x-splitserve-variant"  # response header / gRPC metadata: the variant that served


@dataclass(frozen=True)
class Routed:
    """Where one request goes: ``model`` serves it, ``requested`` is what
    the client asked for (echoed in responses), ``route`` is set when that
    was a route."""

    requested: str
    model: str
    route: str | None = None


def _record_metrics(o: VariantOutcome) -> None:
    from splitserve.cluster.observability.metrics import record

    record("splitserve_route_requests", 1, route=o.route, variant=o.variant,
           outcome="ok" if o.ok else "error")
    if o.ttft_s >= 0:
        record("splitserve_route_ttft_seconds", o.ttft_s, route=o.route, variant=o.variant)
    if o.tpot_s >= 0:
        record("splitserve_route_tpot_seconds", o.tpot_s, route=o.route, variant=o.variant)


class Routing:
    """An ingress's routes: the table in force, filtered to the models this
    ingress serves. This base keeps the table it is given (tests, a single
    process); the cluster's ``RouteClient`` follows the route controller."""

    def __init__(self, table: RouteTable | None = None, served: set[str] | None = None,
                 rng: random.Random | None = None):
        self._served = served
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # preparation threads and the loop read the table
        self._table = RouteTable(0)
        self.install(table or RouteTable(0))

    @property
    def table(self) -> RouteTable:
        return self._table

    def install(self, table: RouteTable) -> None:
        """Use ``table`` from now on: variants this ingress does not serve
        (a deploy adding a model reaches it later) are left out; a route
        with no servable weight left is not offered."""
        routes = []
        for r in table.routes:
            pairs = [(v, w) for v, w in zip(r.variants, r.weights)
                     if self._served is None or v in self._served]
            if sum(w for _, w in pairs) > 0:
                routes.append(RouteWeights(r.name, tuple(v for v, _ in pairs),
                                           tuple(w for _, w in pairs), r.key_header, r.sticky))
        with self._lock:
            self._table = RouteTable(table.version, tuple(routes))
        self._publish_weights()

    def _publish_weights(self) -> None:
        from splitserve.cluster.observability.metrics import record

        for r in self._table.routes:
            total = sum(r.weights) or 1.0
            for v, w in zip(r.variants, r.weights):
                record("splitserve_route_weight", w / total, route=r.name, variant=v)

    def resolve(self, model: str, key_for: Callable[[str | None], str | None]) -> Routed:
        """Where a request for ``model`` goes; ``key_for(header)`` returns
        the client key the request carries (``header``: the route's key
        header, or None when it has none)."""
        route = self._table.get(model)
        if route is None:
            return Routed(model, model)
        with self._lock:  # random.Random is not shared across threads unguarded
            variant = pick(route, key_for(route.key_header), self._rng)
        return Routed(model, variant, route.name)

    def record(self, outcome: VariantOutcome) -> None:
        """A routed request ended: its metrics (the cluster's client also
        sends it to the route controller)."""
        _record_metrics(outcome)

    def model_cards(self, served: list[ModelInfo]) -> list[ModelInfo]:
        """The routes as models (/v1/models): each with the smallest context
        of its variants."""
        by_name = {m.name: m for m in served}
        out = []
        for r in self._table.routes:
            variants = [by_name[v] for v in r.variants if v in by_name]
            if variants:
                out.append(ModelInfo(r.name, min(m.max_model_len for m in variants),
                                     min(m.created for m in variants),
                                     vocab_size=min(m.vocab_size for m in variants)))
        return out

    async def track(self, routed: Routed, stream: AsyncIterator[dict]) -> AsyncIterator[dict]:
        """``stream`` (the variant's backend stream), reporting how it ended;
        closing this closes ``stream`` (which cancels its request)."""
        if routed.route is None:
            try:
                async for out in stream:
                    yield out
            finally:
                await stream.aclose()
            return
        start = time.monotonic()
        first = last = None
        tokens = 0
        finished = False
        outcome: bool | None = None
        try:
            async for out in stream:
                n = len(out.get("token_ids") or ())
                if n:
                    now = time.monotonic()
                    first = now if first is None else first
                    last = now
                    tokens += n
                finished = finished or bool(out.get("finished"))
                yield out
            outcome = finished  # a stream that ends unfinished failed on the server's side
        except (InvalidRequestError, UnknownModel, Overloaded):
            raise  # the request's own fault, or capacity: no verdict on the variant
        except (GeneratorExit, asyncio.CancelledError):
            if finished:  # closed after its last output: it was served
                outcome = True
            raise  # else the client went away
        except Exception:
            outcome = False
            raise
        finally:
            await stream.aclose()
            if outcome is not None:
                ttft = first - start if first is not None else -1.0
                tpot = (last - first) / (tokens - 1) if tokens > 1 else -1.0
                self.record(VariantOutcome(routed.route, routed.model, outcome, ttft, tpot))


def all_models(backend: "Backend") -> list[ModelInfo]:
    """The served models, then the routes (GET /v1/models, ListModels)."""
    served = backend.models()
    return served + backend.routing.model_cards(served)


def model_info(backend: "Backend", model: str) -> ModelInfo:
    """``backend.model_info`` that also knows the routes (GET /v1/models/{id})."""
    for card in backend.routing.model_cards(backend.models()):
        if card.name == model:
            return card
    return backend.model_info(model)


def resolve_http(backend: "Backend", headers, body) -> tuple[Routed, object]:
    """(where the request goes, ``body`` naming the model that serves it).
    The client key: the route's key header if sent, else the body's
    ``user`` field."""
    user = getattr(body, "user", None)

    def key_for(header: str | None) -> str | None:
        return (headers.get(header) if header else None) or user

    routed = backend.routing.resolve(body.model, key_for)
    if routed.route is None:
        return routed, body
    return routed, body.model_copy(update={"model": routed.model})


def variant_headers(routed: Routed) -> dict[str, str]:
    return {VARIANT_HEADER: routed.model} if routed.route is not None else {}
