"""Which address of its node a process serves on: the one the operator gave
the node (``--node-ip-address``), not whichever interface the OS or Ray's
guess would pick, so that certificates listing the nodes' addresses
(``transfer.tls``) match what clients dial."""

from __future__ import annotations

import os

import ray


def node_address() -> str:
    """The address this node registered with Ray (``--node-ip-address``),
    e.g. 127.0.0.1 for a local cluster."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


def bind_host(configured: str | None = None) -> str:
    """``configured`` (``transfer.bind_host``), else ``$SPLITSERVE_BIND_HOST``,
    else ``node_address()``."""
    return configured or os.environ.get("SPLITSERVE_BIND_HOST") or node_address()
