"""Serve's HTTP proxy options from the operator's endpoints section, and
the refusal of a redeploy that would change them on a running cluster;
who serves HTTP (Serve's proxy or the ingress replicas) and the refusal to
switch it on a running cluster."""

import pytest

from splitserve.cluster.config import ConfigError
from splitserve.cluster.config.access import EndpointSpec
from splitserve.cluster.serve.http_proxy import (check_mode, check_unchanged, proxy_options,
                                                 serve_start_options, url)


def test_plain_http_and_https_options_and_urls():
    plain = EndpointSpec(http_port=8100)
    assert proxy_options(plain) == {"host": "127.0.0.1", "port": 8100}
    assert url(plain) == "http://127.0.0.1:8100"
    tls = EndpointSpec(http_port=8443, http_tls_cert="/etc/c.pem", http_tls_key="/etc/k.pem")
    assert proxy_options(tls) == {"host": "127.0.0.1", "port": 8443,
                                  "ssl_certfile": "/etc/c.pem", "ssl_keyfile": "/etc/k.pem"}
    assert url(tls) == "https://127.0.0.1:8443"


def test_a_running_proxy_keeps_its_address_and_tls_so_changing_them_is_refused():
    running = EndpointSpec(http_port=8000)
    check_unchanged(running, EndpointSpec(http_port=8000, grpc_port=6000))  # gRPC: the ingress'
    with pytest.raises(ConfigError) as e:
        check_unchanged(running, EndpointSpec(http_port=8001, http_tls_cert="/c.pem",
                                              http_tls_key="/k.pem"))
    msg = str(e.value)
    assert "endpoints.http_port: 8000 -> 8001" in msg
    assert "endpoints.http_tls_cert: None -> '/c.pem'" in msg and "splitserve shutdown" in msg


def test_ingress_mode_starts_serve_without_a_proxy():
    assert serve_start_options(EndpointSpec(http_port=8100)) == {
        "http_options": {"host": "127.0.0.1", "port": 8100}}
    ing = EndpointSpec(http_port=8100, http_server="ingress", http_tls_cert="/c.pem",
                       http_tls_key="/k.pem")
    assert serve_start_options(ing) == {"proxy_location": "Disabled"}
    assert url(ing) == "https://127.0.0.1:8100"  # the same address either way


def test_in_ingress_mode_the_address_and_tls_roll_the_ingress_instead_of_being_refused():
    running = EndpointSpec(http_port=8000, http_server="ingress")
    check_unchanged(running, EndpointSpec(http_port=8001, http_server="ingress",
                                          http_tls_cert="/c.pem", http_tls_key="/k.pem"))


@pytest.mark.parametrize("was,want", [("proxy", "ingress"), ("ingress", "proxy")])
def test_switching_who_serves_http_on_a_running_cluster_is_refused(was, want):
    with pytest.raises(ConfigError) as e:
        check_unchanged(EndpointSpec(http_server=was), EndpointSpec(http_server=want))
    msg = str(e.value)
    assert f"endpoints.http_server: {was!r} -> {want!r}" in msg and "splitserve shutdown" in msg
    # the running Serve's own state says the same, whatever the ledger holds
    with pytest.raises(ConfigError, match="fixed when Serve starts"):
        check_mode(was == "proxy", EndpointSpec(http_server=want))
    check_mode(want == "proxy", EndpointSpec(http_server=want))


def test_ingress_mode_needs_a_fixed_http_port():
    with pytest.raises(ValueError, match="set a fixed http_port"):
        EndpointSpec(http_port=0, http_server="ingress")
    assert EndpointSpec(http_port=0).http_server == "proxy"  # Serve's proxy may pick one
    with pytest.raises(ValueError):
        EndpointSpec(http_server="nginx")


def test_serves_proxy_failing_to_bind_is_a_deploy_error_naming_the_address():
    # what serve.start raises when another process holds the proxy's port:
    # a Ray task error carrying the proxy actor's traceback
    from ray.exceptions import RayTaskError

    from splitserve.cluster.serve.app_status import DeployFailed
    from splitserve.cluster.serve.http_proxy import proxy_start_failed

    cause = RuntimeError("Failed to bind to address '127.0.0.1:8123'.")
    tb = ("Traceback (most recent call last):\n"
          '  File "ray/serve/_private/proxy.py", line 1807, in ready\n'
          "    self._running_http_server_task, _ = await self._start_http_server_task\n"
          '  File "ray/serve/_private/http_util.py", line 786, in start_asgi_http_server\n'
          "    raise RuntimeError(\n"
          "RuntimeError: Failed to bind to address '127.0.0.1:8123'.")
    err = proxy_start_failed(EndpointSpec(http_port=8123),
                             RayTaskError("ProxyActor.ready", tb, cause))
    assert isinstance(err, DeployFailed)
    assert str(err) == (
        "Ray Serve's HTTP proxy did not start on 127.0.0.1:8123 (endpoints.host / "
        "endpoints.http_port; is another process holding the port?): RuntimeError: Failed to "
        "bind to address '127.0.0.1:8123'.")
