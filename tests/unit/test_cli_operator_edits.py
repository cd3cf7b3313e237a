"""An operator's hand-written YAML through ``splitserve deploy --dry-run``
(no cluster: validation only) and the pieces of ``deploy`` / ``status``
output that need no cluster: what YAML parses silently but cannot be meant
(a repeated key, NaN, a boolean where a number goes, a 10 MB file, an
address no socket takes) is refused with exit status 2 and one line naming
the file, the key and its line."""

import pytest

from splitserve.cluster.cli.main import main
from splitserve.cluster.config import ClusterConfig, config_changes

NOWHERE = "127.0.0.1:1"  # no Ray cluster answers: --dry-run validates only


def dry_run(tmp_path, monkeypatch, text: str | bytes):
    monkeypatch.setenv("RAY_ADDRESS", NOWHERE)
    p = tmp_path / "cluster.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return main(["deploy", "--dry-run", str(p)]), p


def refused(tmp_path, monkeypatch, capsys, text) -> str:
    code, p = dry_run(tmp_path, monkeypatch, text)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {p}: "), err
    return lines[0]


def test_a_repeated_key_is_refused_with_both_lines(tmp_path, monkeypatch, capsys):
    line = refused(tmp_path, monkeypatch, capsys,
                   "endpoints:\n  http_port: 8000\nname: a\nendpoints:\n  grpc_port: 1\n")
    assert "'endpoints' appears twice (lines 1 and 4)" in line
    line = refused(tmp_path, monkeypatch, capsys,
                   "models:\n  - decode:\n      max_replicas: 2\n      max_replicas: 4\n")
    assert "'max_replicas' appears twice (lines 3 and 4)" in line


def test_a_merge_key_overridden_is_not_a_repeat(tmp_path, monkeypatch, capsys):
    code, _ = dry_run(tmp_path, monkeypatch,
                      "models:\n  - prefill: &p {min_replicas: 1, max_replicas: 2}\n"
                      "    decode:\n      <<: *p\n      max_replicas: 3\n")
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", ["endpoints:\n  drain_s", "router:\n  network_bytes_per_s",
                                 "models:\n  - decode:\n      autoscaling:\n"
                                 "        bottleneck: network\n        link_bytes_per_s"])
def test_non_finite_numbers_are_refused_as_such(tmp_path, monkeypatch, capsys, key, value):
    line = refused(tmp_path, monkeypatch, capsys, f"{key}: {value}\n")
    assert "Input should be a finite number" in line


@pytest.mark.parametrize("key", ["endpoints:\n  drain_s", "endpoints:\n  http_port",
                                 "models:\n  - decode:\n      max_replicas"])
def test_a_boolean_is_not_a_number(tmp_path, monkeypatch, capsys, key):
    line = refused(tmp_path, monkeypatch, capsys, f"{key}: true\n")
    assert "true/false where a number goes" in line


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path, monkeypatch, capsys):
    text = "name: big\nauth:\n  api_keys:\n" + "    - k0123456789abcdef\n" * 120_000
    line = refused(tmp_path, monkeypatch, capsys, text)
    assert f"{len(text) / 1e6:.1f} MB" in line and "at most 1 MB" in line
    assert "auth.api_keys_file" in line


@pytest.mark.parametrize("host", ["''", "'not a host'", "'10.0.0.1:8000'", "'http://x'"])
def test_an_address_no_socket_binds_is_refused(tmp_path, monkeypatch, capsys, host):
    line = refused(tmp_path, monkeypatch, capsys,
                   f"auth:\n  api_keys: [k]\nendpoints:\n  host: {host}\n")
    assert "endpoints.host (line 4, column 3)" in line and "IP address or host name" in line


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "node-1.example.internal", "localhost"])
def test_addresses_and_host_names_are_taken(tmp_path, monkeypatch, capsys, host):
    code, _ = dry_run(tmp_path, monkeypatch,
                      f"auth:\n  api_keys: [k]\nendpoints:\n  host: '{host}'\n")
    assert code == 0, capsys.readouterr().err


def test_an_absurd_body_limit_is_refused(tmp_path, monkeypatch, capsys):
    line = refused(tmp_path, monkeypatch, capsys,
                   "endpoints:\n  max_body_bytes: 1000000000000000\n")
    assert "endpoints.max_body_bytes (line 2, column 3)" in line


def _cfg(model_extra: dict) -> ClusterConfig:
    return ClusterConfig.model_validate({"models": [{"model": {"name": "m", **model_extra}}]})


def test_an_adapter_added_is_one_line():
    old = _cfg({"max_loras": 2})
    new = _cfg({"max_loras": 2, "adapters": [{"name": "py", "path": "/a/py"}]})
    assert config_changes(old, new) == ["models[m].model.adapters[py]: added (path '/a/py')"]
    assert config_changes(new, old) == ["models[m].model.adapters[py]: removed"]


def test_a_section_added_or_removed_is_one_line():
    old = _cfg({})
    new = _cfg({"speculative": {"method": "ngram", "num_speculative_tokens": 3}})
    # what the file sets, not every default of the section
    assert config_changes(old, new) == [
        "models[m].model.speculative: added (method 'ngram', num_speculative_tokens 3)"]
    assert config_changes(new, old) == ["models[m].model.speculative: removed"]
