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


def test_a_fixed_pool_reports_its_size_as_target():
    from splitserve.cluster.cli.ops import fixed_target

    cfg = ClusterConfig.model_validate({"models": [{
        "prefill": {"min_replicas": 2, "max_replicas": 2, "autoscaling": None},
        "decode": {"min_replicas": 1, "max_replicas": 3,
                   "autoscaling": {"bottleneck": "memory"}}}]})
    assert fixed_target(cfg.models[0].prefill) == 2
    assert fixed_target(cfg.models[0].decode) is None  # the autoscaler's decisions say


def test_a_local_address_uses_this_machines_ray_token(monkeypatch):
    # `splitserve serve` prints this machine's Ray address; Ray itself only
    # sends its token to a cluster it finds as "auto"
    from splitserve.cluster.cli.ray_address import local_address_without_auth_mode as local

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert local("127.0.0.1:6379") and local("localhost:6379")
    assert not local("198.51.100.7:6379")  # TEST-NET-2: no machine's own address
    assert not local("auto") and not local("ray://127.0.0.1:10001")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not local("127.0.0.1:6379")  # the operator's choice stands


def test_python_dash_m_runs_the_command(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr("sys.argv", ["splitserve", "status", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("splitserve.cluster.cli", run_name="__main__")
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: splitserve status")


# -- ShareGPT files for `splitserve bench` --------------------------------------------------
GOOD_CONV = '{"conversations": [{"from": "human", "value": "%s"}, {"from": "gpt", "value": "%s"}]}'


def bench_refused(tmp_path, capsys, text: str, n: int = 1) -> str:
    p = tmp_path / "sharegpt.json"
    p.write_text(text)
    # nothing listens at the URL: the file is refused before any request
    code = main(["bench", "--url", "http://127.0.0.1:1", "--dataset", str(p),
                 "--num-requests", str(n), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {p}: "), line
    return line[len(f"error: {p}: "):]


@pytest.mark.parametrize("entry,why", [
    ('"just text"', "a conversation is an object, got str"),
    ('{"messages": [{"role": "user", "content": "hello there"}]}',
     "no 'conversations' list (ShareGPT: {\"conversations\": [{\"from\": \"human\", "
     "\"value\": \"...\"}, ...]})"),
    ('{"conversations": "oops"}', "'conversations' must be a list of turns, got str"),
    ('{"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "b"}]}',
     "turn 1 has no text 'value' (a string)"),
    ('{"conversations": [["human", "hello"], {"from": "gpt", "value": "b"}]}',
     "turn 1 has no text 'value' (a string)"),
])
def test_a_malformed_conversation_is_named_with_its_line(tmp_path, capsys, entry, why):
    good = GOOD_CONV % ("a" * 40, "b" * 40)
    text = "[\n" + ",\n".join([good] * 5) + ",\n\n" + entry + "\n]\n"  # the bad one: line 8
    assert bench_refused(tmp_path, capsys, text) == f"conversation 6 (line 8): {why}"


def test_too_few_usable_conversations_say_why_each_was_skipped(tmp_path, capsys):
    convs = [GOOD_CONV % ("hi", "hello"), GOOD_CONV % ("a" * 40, "b" * 40),
             '{"conversations": [{"from": "human", "value": "only one turn"}]}']
    line = bench_refused(tmp_path, capsys, "[" + ",".join(convs) + "]", n=2)
    assert line.startswith("only 1 usable conversations, 2 asked for")
    assert line.endswith("skipped: 1 with fewer than 2 turns, 1 with a prompt or reply under "
                         "4 tokens")


# -- a hardware catalog edited by hand (`splitserve profile --catalog FILE --list`) --------
CATALOG = """\
efficiency: {matmul: 0.6, memory: 0.8}
gpus:
  my-gpu:
    name: My GPU
    peak_flops: {bfloat16: 100.0e12}
    memory_bandwidth: 1.0e12
    memory_bytes: 24.0e9
    intra_node_bandwidth: 50.0e9
    network_bandwidth: 12.5e9
    source: my datasheet
"""


@pytest.mark.parametrize("edit,message", [
    (("24.0e9", "true"), "gpus.my-gpu: 'memory_bytes' must be a number, got True"),
    (("    source: my datasheet\n", "    source: my datasheet\n    memory_bytes: 48.0e9\n"),
     "invalid YAML: line 11, column 5: 'memory_bytes' appears twice (lines 7 and 11); YAML "
     "would keep the second silently: keep one"),
])
def test_a_catalog_edit_that_cannot_be_meant_is_refused(tmp_path, capsys, edit, message):
    p = tmp_path / "catalog.yaml"
    p.write_text(CATALOG.replace(*edit))
    code = main(["profile", "--catalog", str(p), "--list", "--db", str(tmp_path / "p.db")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {p}: {message}\n"


def test_a_hand_written_catalog_loads(tmp_path, capsys):
    p = tmp_path / "catalog.yaml"
    p.write_text(CATALOG)
    assert main(["profile", "--catalog", str(p), "--list", "--db", str(tmp_path / "p.db")]) == 0
    assert "my-gpu" in capsys.readouterr().out


def test_shutdown_where_nothing_listens_fails_at_once(capsys):
    assert main(["shutdown", "--address", NOWHERE]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot connect to the Ray cluster: nothing answers at "
                          "127.0.0.1:1") and len(err.strip().splitlines()) == 1


def test_an_azure_row_with_a_value_past_the_header_is_refused(tmp_path):
    from splitserve.cluster.planning.workload import TraceError, read_trace

    p = tmp_path / "t.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,100,10,\n1,2,000,10\n")
    with pytest.raises(TraceError) as e:  # line 2's empty trailing field is fine
        list(read_trace(p))
    assert str(e.value) == f"{p} line 3: 4 fields, the header has 3 (an unquoted comma?)"


def test_a_dry_run_checks_checkpoints_and_adapters_as_the_deploy_does(
        tmp_path, monkeypatch, capsys, tiny_llama):
    """What the deploy refuses before it changes anything, the dry run
    refuses too: a model path nothing is at, an adapter that cannot be read
    or does not fit its model (exit status 1, one line naming them)."""
    from tests.fixtures.lora_adapters import build_adapter

    good = build_adapter(tiny_llama, tmp_path / "good", seed=1)
    wide = build_adapter(tiny_llama, tmp_path / "wide", seed=2, r=32)

    def cfg(path, adapters):
        items = "".join(f"\n        - {{name: {n}, path: '{p}'}}" for n, p in adapters)
        return (f"models:\n  - model:\n      name: m\n      path: '{path}'\n"
                f"      max_loras: 2\n      max_lora_rank: 16\n      adapters:{items or ' []'}\n")

    code, _ = dry_run(tmp_path, monkeypatch, cfg(tiny_llama, [("good", good)]))
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    for text, why in [
        (cfg(tmp_path / "nowhere", []), "model 'm': checkpoint directory"),
        (cfg(tiny_llama, [("good", good), ("gone", tmp_path / "gone")]), "model 'm', adapter 'gone': "),
        (cfg(tiny_llama, [("wide", wide)]), "model 'm', adapter 'wide': "),
    ]:
        code, p = dry_run(tmp_path, monkeypatch, text)
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: {p}: {why}") and len(err.strip().splitlines()) == 1, err
