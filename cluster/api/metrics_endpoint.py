"""GET /metrics on the HTTP port: the cluster's Prometheus metrics.

What it holds and where each number comes from:
splitserve.cluster.observability.exposition. One scrape costs the ingress
one router call (``Backend.cluster_metrics``, bounded by
``ROUTER_QUERY_S``); when the router cannot be reached the scrape still
answers, with the ingress's own request metrics only, and logs why.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI
from starlette.responses import Response

from splitserve.cluster.api.backend import Backend
from splitserve.cluster.observability.exposition import CONTENT_TYPE, render

METRICS_PATH = "/metrics"
WARN_EVERY_S = 60.0
log = logging.getLogger("splitserve.metrics")


def add_metrics_route(app: FastAPI, backend: Backend, vllm_names: bool) -> None:
    last_warning = [float("-inf")]

    @app.get(METRICS_PATH)
    async def metrics() -> Response:
        cluster = await backend.cluster_metrics()
        if cluster.errors and time.monotonic() - last_warning[0] > WARN_EVERY_S:
            last_warning[0] = time.monotonic()
            log.warning("/metrics is missing replica metrics: %s", "; ".join(cluster.errors))
        return Response(render(cluster, vllm_names), media_type=CONTENT_TYPE)
