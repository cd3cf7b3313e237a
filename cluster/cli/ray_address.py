"""Which Ray cluster the operator commands (``deploy``, ``status``,
``shutdown``) join: the ``--address`` option, and joining it, with this
machine's Ray token for an address of this machine."""

from __future__ import annotations

import os
import sys


def add_address_argument(p) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address, e.g. 10.0.0.1:6379 (default: $RAY_ADDRESS, or "
                        "the cluster started on this machine)")


def join_cluster(address: str | None) -> None:
    """Join the Ray cluster; ConnectionError at once when nothing listens at
    an explicit HOST:PORT (``ray.init`` would retry for minutes)."""
    from splitserve.cluster.cli.common import check_reachable

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    check_reachable(address)
    if local_address_without_auth_mode(address):
        # Ray turns its token on by itself only for a cluster it finds as
        # "auto": the address `splitserve serve` prints (this machine's, or
        # loopback) would otherwise fail with InvalidAuthToken after 15 s
        # of retries where the head holds the token this machine keeps (a
        # private Ray call: without it, as before, RAY_AUTH_MODE=token works)
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available)
        except ImportError:
            pass
        else:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    from splitserve.cluster.serve.app import connect

    connect(address)


def join_or_report(address: str | None) -> bool:
    """``join_cluster``; False, with the reason on stderr, where it cannot."""
    try:
        join_cluster(address)
    except (ConnectionError, RuntimeError) as e:
        print(f"error: cannot connect to the Ray cluster: {e}", file=sys.stderr)
        return False
    return True


def local_address_without_auth_mode(address: str) -> bool:
    """Whether ``address`` (HOST:PORT) is on this machine and
    $RAY_AUTH_MODE leaves Ray's token authentication to its defaults: then
    the client uses this machine's token when it has one, as Ray's own
    ``auto`` does (a remote address needs RAY_AUTH_MODE=token, as Ray asks)."""
    import socket

    if "RAY_AUTH_MODE" in os.environ or "://" in address or address in ("auto", "local"):
        return False
    host = address.rpartition(":")[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            try:
                sock.bind((sockaddr[0], 0))  # only an address of this machine binds
                return True
            except OSError:
                continue
    return False
