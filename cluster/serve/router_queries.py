"""Operator queries of the router actors from an ingress: readiness
(``live_replicas``) and /metrics (``metrics_scrape``), over the same
router links its ``RouterClient`` places through."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Sequence

from splitserve.router.exchange import RouterUnavailableError


class RouterQueries:
    def __init__(self, links: Sequence[Any], handle: Callable[[Any], Awaitable[Any]],
                 order: Callable[[str], list[int]]):
        """``links``: the client's router links (``up``: answering now);
        ``handle``: a link's actor handle; ``order``: a model's routers in
        the order its requests try them (``router_names.router_order``)."""
        self._links = links
        self._handle = handle
        self._order = order

    async def ask(self, method: str, timeout_s: float) -> Any:
        """An operator query (``live_replicas``, ``metrics_scrape``) of the
        first router that answers within ``timeout_s``: every router holds
        every replica's stats, so any one will do."""
        error: BaseException = RouterUnavailableError("no router is configured")
        for link in self._links:
            try:
                handle = await asyncio.wait_for(self._handle(link), timeout_s)
                return await asyncio.wait_for(getattr(handle, method).remote(), timeout_s)
            except Exception as e:  # noqa: BLE001 - down or restarting: ask the next one
                error = e
        raise error

    async def ask_placing(self, models: Sequence[str], method: str,
                          timeout_s: float) -> dict[str, tuple[int, Any]]:
        """model -> (router index, its answer to ``method``) from the router
        that places the model's requests now: the first in the model's order
        that is up here and answers within ``timeout_s`` (so readiness is
        judged by the router the requests go to). Each router is asked once.
        Raises the last error when no router answered for some model."""
        answers: dict[int, Any] = {}
        out: dict[str, tuple[int, Any]] = {}
        for model in models:
            order = self._order(model)
            error: BaseException = RouterUnavailableError(f"no router is up for model {model!r}")
            for i in [i for i in order if self._links[i].up] or order:
                if i not in answers:
                    try:
                        handle = await asyncio.wait_for(self._handle(self._links[i]), timeout_s)
                        answers[i] = await asyncio.wait_for(getattr(handle, method).remote(),
                                                            timeout_s)
                    except Exception as e:  # noqa: BLE001 - down or restarting: the next one
                        answers[i] = e
                if isinstance(answers[i], BaseException):
                    error = answers[i]
                    continue
                out[model] = (i, answers[i])
                break
            else:
                raise error
        return out
