"""How the router actors are named and which one places each model.

Routers are named Ray actors in ``NAMESPACE``: router 0 keeps the
historical name, the others are numbered. Each model has a fixed order
over the routers (``router_order``), the same in every process, so every
ingress sends a model's requests to the same router while it is up.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

ROUTER_NAME = "splitserve-router"
NAMESPACE = "splitserve"
MAX_ROUTERS = 16


def router_name(index: int) -> str:
    """Router 0 keeps the historical name; the others are numbered."""
    return ROUTER_NAME if index == 0 else f"{ROUTER_NAME}-{index}"


def router_order(model: str, count: int, models: Sequence[str] = ()) -> list[int]:
    """The routers of ``model`` in the order an ingress tries them, the same
    in every process: the i-th of the cluster's ``models`` starts at router
    i mod count (so N models spread over N routers); any other model by a
    hash of its name."""
    if model in models:
        start = list(models).index(model) % count
        return [(start + k) % count for k in range(count)]

    def rank(i: int) -> bytes:
        return hashlib.blake2b(f"{model}\0{i}".encode(), digest_size=8).digest()
    return sorted(range(count), key=rank)
