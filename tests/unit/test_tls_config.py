"""The operator's ``transfer.tls`` section: what it requires, and the PEM
files read into the TLS config both internal planes use."""

import pytest

from splitserve.cluster.config import ConfigError, parse_config
from splitserve.handoff.tls import TLSConfig
from tests.unit.tls_certs import CA


def test_tls_needs_cert_key_and_ca():
    with pytest.raises(ConfigError, match="transfer.tls.ca: Field required"):
        parse_config({"transfer": {"tls": {"cert": "a.crt", "key": "a.key"}}})
    with pytest.raises(ConfigError, match="transfer.tls.mutal: Extra inputs"):
        parse_config({"transfer": {"tls": {"cert": "a", "key": "b", "ca": "c", "mutal": True}}})
    assert parse_config({}).transfer.tls is None


def test_the_files_are_read_into_one_tls_config(tmp_path):
    ca = CA()
    cert, key = ca.issue("replicas.splitserve.test").write(tmp_path, "replica")
    (tmp_path / "ca.crt").write_bytes(ca.cert)
    spec = parse_config({"transfer": {"tls": {
        "cert": cert, "key": key, "ca": str(tmp_path / "ca.crt"), "mutual": True,
        "server_name": "replicas.splitserve.test"}}}).transfer.tls
    tls = spec.load()
    assert tls == TLSConfig(cert_chain=(tmp_path / "replica.crt").read_bytes(),
                            private_key=(tmp_path / "replica.key").read_bytes(),
                            root_certs=ca.cert, server_name="replicas.splitserve.test",
                            require_client_cert=True)


def test_an_unreadable_or_non_pem_file_names_its_key(tmp_path):
    (tmp_path / "junk").write_text("not a certificate")
    spec = parse_config({"transfer": {"tls": {
        "cert": str(tmp_path / "missing.crt"), "key": str(tmp_path / "junk"),
        "ca": str(tmp_path / "junk")}}}).transfer.tls
    with pytest.raises(ConfigError, match=r"transfer.tls.cert .*missing.crt: No such file"):
        spec.load()
    spec = spec.model_copy(update={"cert": str(tmp_path / "junk")})
    with pytest.raises(ConfigError, match=r"transfer.tls.cert .*junk: not a PEM file"):
        spec.load()
