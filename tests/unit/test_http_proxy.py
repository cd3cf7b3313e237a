"""Serve's HTTP proxy options from the operator's endpoints section, and
the refusal of a redeploy that would change them on a running cluster."""

import pytest

from splitserve.cluster.config import ConfigError
from splitserve.cluster.config.access import EndpointSpec
from splitserve.cluster.serve.http_proxy import check_unchanged, proxy_options, url


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
    assert "endpoints.http_tls_cert: None -> '/c.pem'" in msg and "serve shutdown" in msg
