"""Who serves the OpenAI HTTP API (``endpoints.http_server``), and what
Serve is started with for it.

``proxy``: Serve's HTTP proxy, started with the API's address and, with
``endpoints.http_tls_cert`` / ``http_tls_key``, HTTPS. Serve takes these
options only when it starts (``serve.start`` on a running Serve ignores
them), so ``splitserve.cluster.serve.app.deploy`` refuses a file that
changes them on a running cluster rather than leave the proxy on the old
address, or serving plaintext where the file asks for TLS. The certificate
and key are read by the proxy on every node, at the same paths.

``ingress``: Serve runs no proxy (``proxy_location`` Disabled); each ingress
replica serves the API itself (``splitserve.cluster.api.http_server``), so
the address and TLS files are the ingress's settings: changing them rolls
the ingress. Whether Serve runs a proxy is also fixed when it starts, so
switching ``http_server`` on a running cluster is refused.
"""

from __future__ import annotations

from typing import Any

from splitserve.cluster.config import ConfigError
from splitserve.cluster.config.access import EndpointSpec

# the fields the proxy reads at its start
PROXY_FIELDS = ("host", "http_port", "http_tls_cert", "http_tls_key")
RESTART = ("stop Serve (`splitserve shutdown`) and deploy again (every application restarts)")


def proxy_options(ep: EndpointSpec) -> dict[str, Any]:
    """``serve.start``'s ``http_options`` for ``ep`` in proxy mode."""
    opts: dict[str, Any] = {"host": ep.host, "port": ep.http_port}
    if ep.http_tls_cert is not None:
        opts.update(ssl_certfile=ep.http_tls_cert, ssl_keyfile=ep.http_tls_key)
    return opts


def serve_start_options(ep: EndpointSpec) -> dict[str, Any]:
    """``serve.start``'s keyword arguments for ``ep``: the proxy's options,
    or no proxy at all when the ingress replicas serve HTTP."""
    if ep.http_server == "ingress":
        return {"proxy_location": "Disabled"}
    return {"http_options": proxy_options(ep)}


def start_serve(ep: EndpointSpec) -> None:
    """``serve.start`` for ``ep`` (a no-op on a running Serve). Serve's
    proxy failing to start (its port held by another process) raises
    ``DeployFailed`` naming the address, rather than the proxy actor's
    traceback."""
    from ray import serve

    try:
        serve.start(**serve_start_options(ep))
    except Exception as e:  # noqa: BLE001 - Ray wraps the proxy's error in its own types
        if ep.http_server != "proxy":
            raise
        raise proxy_start_failed(ep, e) from e


def proxy_start_failed(ep: EndpointSpec, error: BaseException):
    """The ``DeployFailed`` for Serve's proxy not starting on ``ep``'s
    address: the address, the settings, and the last line of ``error`` (a
    Ray task error holds the proxy actor's whole traceback)."""
    from splitserve.cluster.serve.app_status import DeployFailed, last_line

    cause = last_line(str(error)) or type(error).__name__
    return DeployFailed(
        f"Ray Serve's HTTP proxy did not start on {ep.host}:{ep.http_port} (endpoints.host / "
        f"endpoints.http_port; is another process holding the port?): {cause}")


def check_unchanged(running: EndpointSpec, ep: EndpointSpec) -> None:
    """Raise ConfigError naming what ``ep`` changes from the ``running``
    cluster's that only a new Serve instance takes: ``http_server``, and in
    proxy mode the proxy's address and TLS files (in ingress mode the ingress
    rolls to take them)."""
    if running.http_server != ep.http_server:
        check_mode(running.http_server == "proxy", ep)
    if ep.http_server != "proxy":
        return
    changed = [f"endpoints.{f}: {getattr(running, f)!r} -> {getattr(ep, f)!r}"
               for f in PROXY_FIELDS if getattr(running, f) != getattr(ep, f)]
    if changed:
        raise ConfigError(
            "Serve's HTTP proxy takes its address and TLS files only when it starts, and this "
            f"cluster's is running: {'; '.join(changed)}. Keep the running values, or {RESTART}.")


def check_mode(proxy_running: bool, ep: EndpointSpec) -> None:
    """Raise ConfigError when ``ep.http_server`` needs the opposite of what
    the running Serve does (``proxy_running``: whether it runs its HTTP
    proxy): Serve decides that when it starts."""
    if proxy_running == (ep.http_server == "proxy"):
        return
    was, want = ("proxy", "ingress") if proxy_running else ("ingress", "proxy")
    why = ("its proxy holds http_port, which the ingress replicas would need" if proxy_running
           else "it was started without an HTTP proxy, and starts none while it runs")
    raise ConfigError(
        f"endpoints.http_server: {was!r} -> {want!r} cannot apply to this running cluster: "
        f"whether Ray Serve runs its HTTP proxy is fixed when Serve starts, and {why}. Keep "
        f"http_server: {was}, or {RESTART}.")


def proxy_running() -> bool | None:
    """Whether the running Serve instance (connected driver) runs HTTP
    proxies; None when it cannot be told."""
    from ray.serve.config import ProxyLocation
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
        location = client._controller.get_proxy_location.remote()
        import ray

        return ray.get(location, timeout=10) != ProxyLocation.Disabled
    except Exception:  # noqa: BLE001 - a Serve without the call: the ledger's record decides
        return None


def served_by(ep: EndpointSpec) -> str:
    """Who answers on the HTTP API's address, for the CLI's summary."""
    if ep.http_server == "ingress":
        return "served by the ingress replicas, on the nodes that run one"
    return "through Serve's HTTP proxy"


def url(ep: EndpointSpec) -> str:
    """The OpenAI HTTP API's base URL (the same in both modes)."""
    scheme = "https" if ep.http_tls_cert is not None else "http"
    return f"{scheme}://{ep.host}:{ep.http_port}"
