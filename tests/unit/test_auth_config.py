"""Client keys and the cluster token: where they may come from, and the
refusal to serve beyond loopback without client auth."""

import pytest

from splitserve.cluster.config import AuthSpec, ConfigError, is_loopback_host, parse_config
from splitserve.cluster.serve.secrets import new_token, public_config, resolve_api_keys


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.7", True), ("localhost", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("head.example", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize("auth", [{"api_keys": ["k"]}, {"api_keys_file": "/run/keys"},
                                  {"api_keys_env": "KEYS"}])
def test_non_loopback_serving_needs_a_key_source(auth):
    assert parse_config({"endpoints": {"host": "0.0.0.0"}, "auth": auth}).auth.has_api_keys()


def test_non_loopback_without_keys_is_refused_unless_waived():
    with pytest.raises(ConfigError, match="reachable from other machines but no API key"):
        parse_config({"endpoints": {"host": "0.0.0.0"}})
    cfg = parse_config({"endpoints": {"host": "0.0.0.0", "allow_unauthenticated": True}})
    assert cfg.exposure_problem() is None
    assert parse_config({"endpoints": {"host": "127.0.0.1"}}).exposure_problem() is None


@pytest.mark.parametrize("data, message", [
    ({"auth": {"api_keys": [" "]}}, "a key is empty"),
    ({"auth": {"cluster_token": ""}}, "cluster_token: empty"),
    ({"endpoints": {"http_tls_cert": "/c.pem"}}, "http_tls_cert and http_tls_key go together"),
])
def test_bad_secret_settings_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_keys_from_config_file_and_environment(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# team keys\nk-file-1\n\n  k-file-2  \nk-config\n")
    monkeypatch.setenv("MY_KEYS", "k-env-1, k-env-2,,")
    auth = AuthSpec(api_keys=["k-config"], api_keys_file=str(f), api_keys_env="MY_KEYS")
    assert resolve_api_keys(auth) == ["k-config", "k-file-1", "k-file-2", "k-env-1", "k-env-2"]


def test_a_key_source_that_yields_nothing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ABSENT_KEYS", raising=False)
    with pytest.raises(ConfigError, match=r"\$ABSENT_KEYS is not set"):
        resolve_api_keys(AuthSpec(api_keys_env="ABSENT_KEYS"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="hold no key"):
        resolve_api_keys(AuthSpec(api_keys_file=str(empty)))
    with pytest.raises(ConfigError, match="api_keys_file .*missing"):
        resolve_api_keys(AuthSpec(api_keys_file=str(tmp_path / "missing")))
    assert resolve_api_keys(AuthSpec()) == []


def test_cluster_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITSERVE_CLUSTER_TOKEN", raising=False)
    assert parse_config({}).cluster_token() is None  # the cluster makes its own
    monkeypatch.setenv("SPLITSERVE_CLUSTER_TOKEN", "from-env-token")
    assert parse_config({}).cluster_token() == "from-env-token"
    f = tmp_path / "token"
    f.write_text("from-file-token\n")
    assert parse_config({"auth": {"cluster_token_file": str(f)}}).cluster_token() == "from-file-token"
    assert parse_config({"auth": {"cluster_token": "literal-token",
                                  "cluster_token_file": str(f)}}).cluster_token() == "literal-token"


def test_random_tokens_and_secret_free_init_arguments():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) >= 43 for t in tokens)
    cfg = parse_config({"auth": {"api_keys": ["sk-secret"], "cluster_token": "tok-secret",
                                 "api_keys_env": "KEYS"}})
    public = public_config(cfg)
    assert "sk-secret" not in repr(public) and "tok-secret" not in repr(public)
    assert public["auth"]["api_keys_env"] == "KEYS"
