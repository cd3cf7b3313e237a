"""What Serve's HTTP proxy is started with: the OpenAI HTTP API's address
and, with ``endpoints.http_tls_cert`` / ``http_tls_key``, HTTPS.

Serve takes these options only when it starts (``serve.start`` on a running
Serve ignores them), so ``splitserve.cluster.serve.app.deploy`` refuses a
file that changes them on a running cluster rather than leave the proxy on
the old address, or serving plaintext where the file asks for TLS. The
certificate and key are read by the proxy on every node, at the same paths.
"""

from __future__ import annotations

from typing import Any

from splitserve.cluster.config import ConfigError
from splitserve.cluster.config.access import EndpointSpec

# the fields the proxy reads at its start
PROXY_FIELDS = ("host", "http_port", "http_tls_cert", "http_tls_key")


def proxy_options(ep: EndpointSpec) -> dict[str, Any]:
    """``serve.start``'s ``http_options`` for ``ep``."""
    opts: dict[str, Any] = {"host": ep.host, "port": ep.http_port}
    if ep.http_tls_cert is not None:
        opts.update(ssl_certfile=ep.http_tls_cert, ssl_keyfile=ep.http_tls_key)
    return opts


def check_unchanged(running: EndpointSpec, ep: EndpointSpec) -> None:
    """Raise ConfigError naming each proxy field ``ep`` changes from the
    ``running`` cluster's: only a new Serve instance takes them."""
    changed = [f"endpoints.{f}: {getattr(running, f)!r} -> {getattr(ep, f)!r}"
               for f in PROXY_FIELDS if getattr(running, f) != getattr(ep, f)]
    if changed:
        raise ConfigError(
            "Serve's HTTP proxy takes its address and TLS files only when it starts, and this "
            f"cluster's is running: {'; '.join(changed)}. Keep the running values, or stop Serve "
            "(`serve shutdown`) and deploy again (every application restarts).")


def url(ep: EndpointSpec) -> str:
    """The OpenAI HTTP API's base URL."""
    scheme = "https" if ep.http_tls_cert is not None else "http"
    return f"{scheme}://{ep.host}:{ep.http_port}"
