"""Every ``splitserve`` subcommand given fresh, bad input: each exits non-zero
with one message naming the file, line, flag or key, never a traceback or a
silent success; and every option's help says what it takes and its default."""

import argparse
import json
import os
import signal
import socket

import pytest

from splitserve.cluster.cli.main import build_parser, main
from splitserve.cluster.config import ConfigError, load_config
from splitserve.cluster.planning.db import ProfileDB, ProfileDBError
from splitserve.cluster.planning.workload import TraceError, read_trace

GPU_CFG = "deploy/configs/gpu-llama3-8b.yaml"
H100 = ["--shape", "llama-3.1-8b", "--hardware", "h100-sxm"]


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_says_what_it_takes_and_its_default():
    for name, p in _subparsers().items():
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"splitserve {name} {a.option_strings or a.dest}: no help text"
            text = fmt._expand_help(a) if a.help else ""
            has_default = a.default not in (None, False, []) and a.nargs != 0
            if has_default:
                assert "default" in text.lower(), (
                    f"splitserve {name} {a.option_strings}: the default {a.default!r} is not shown")


def test_help_of_each_subcommand_prints_and_exits_0(capsys):
    for name in _subparsers():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert f"usage: splitserve {name}" in capsys.readouterr().out


# -- operator YAML --------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    (b"", "the file is empty (no YAML content); write '{}' for a cluster of all the defaults"),
    (b"models: [\n  - foo: 1\n", "invalid YAML: line 2, column 3: while parsing a flow node: "
                                 "expected the node content, but found '-'"),
    (b"name: x\n\xff\xfe\n", "line 2: not UTF-8 text (byte 0xff); an operator config is a "
                             "YAML file"),
    (b"bogus_key: 1\n", "bogus_key (line 1, column 1): Extra inputs are not permitted"),
    (b"models:\n  - prefill: {min_replicas: -1}\n",
     "models.0.prefill.min_replicas (line 2, column 15): Input should be greater than or "
     "equal to 0"),
    (b"models:\n  - decode: {max_replicas: 99999999999999999999}\n",
     "models.0.decode.max_replicas (line 2, column 14): Input should be less than or equal "
     "to 10000"),
])
def test_bad_operator_yaml_is_one_line_naming_file_and_place(tmp_path, capsys, content, message):
    p = tmp_path / "cluster.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: {message}"
    for argv in (["serve", "--config", str(p), "--print-config"],
                 ["deploy", str(p), "--dry-run"],
                 ["deploy", "--config", str(p), "--dry-run"],
                 ["simulate", "--config", str(p), "--rate", "1", "--num-requests", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"error: {p}: {message}\n"


def test_serve_flag_errors_name_the_flag(capsys):
    assert main(["serve", "--port", "-5", "--print-config"]) == 2
    assert "--port (endpoints.http_port): Input should be greater than or equal to 0" in \
        capsys.readouterr().err
    assert main(["serve", "--max-num-seqs", "0", "--print-config"]) == 2
    assert "--max-num-seqs (models.0.model.max_num_seqs)" in capsys.readouterr().err
    assert main(["serve", "--decode-replicas", "50000", "--print-config"]) == 2
    assert capsys.readouterr().err == "error: --decode-replicas must be from 1 to 10000, got 50000\n"
    assert main(["serve", "--mode", "colocated", "--prefill-replicas", "2", "--print-config"]) == 2
    assert capsys.readouterr().err == ("error: --prefill-replicas: a colocated model has no "
                                       "prefill pool (one pool does both: size it with "
                                       "--decode-replicas)\n")


# -- traces ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,content,message", [
    ("t.jsonl", b"", "t.jsonl: no requests (the file is empty); a Mooncake trace has one JSON "
                     "object per line"),
    ("t.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens\n",
     "t.csv: no requests (only the header); an Azure trace has one row per request"),
    ("t.jsonl", b'{"timestamp": 0, "input_length": 5, "output_length": 5}\n\xff\n',
     "t.jsonl line 2: not UTF-8 text (byte 0xff); a trace is a text file"),
    ("t.jsonl", b'{"timestamp": NaN, "input_length": 5, "output_length": 5}\n',
     "t.jsonl line 1: 'timestamp' (milliseconds) must be a finite number"),
    ("t.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens\ninf,5,5\n",
     "t.csv line 2: TIMESTAMP 'inf' is not a finite number"),
    ("t.jsonl", b'{"timestamp": 0, "input_length": 5, "output_length": 5}\n{"timestamp": 1\n',
     "t.jsonl line 2: not JSON: Expecting ',' delimiter"),
])
def test_bad_trace_names_file_and_line(tmp_path, capsys, name, content, message):
    check_bad_trace(tmp_path, capsys, name, content, message)


def check_bad_trace(tmp_path, capsys, name: str, content: bytes, message: str) -> None:
    """The trace reader and ``splitserve simulate`` refuse the file with
    ``message`` (after its folder), the CLI with exit 2 and that one line."""
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(TraceError) as e:
        list(read_trace(p))
    assert str(e.value) == f"{tmp_path}/{message}"
    rc = main(["simulate", "--config", GPU_CFG, *H100, "--trace", str(p),
               "--db", str(tmp_path / "p.db")])
    assert rc == 2 and capsys.readouterr().err == f"error: {tmp_path}/{message}\n"


def test_trace_time_scale_must_be_positive(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 5}\n')
    with pytest.raises(TraceError, match="the time scale must be a number > 0, got 0"):
        list(read_trace(p, 0))


# -- flags ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["simulate", "--config", GPU_CFG, "--rate", "1", "--num-requests", "-5"],
     "argument --num-requests: must be > 0, got '-5'"),
    (["simulate", "--config", GPU_CFG, "--rate", "1", "--duration", "0"],
     "argument --duration: must be > 0, got '0'"),
    (["simulate", "--config", GPU_CFG, "--trace", "x.jsonl", "--time-scale", "-1"],
     "argument --time-scale: must be > 0, got '-1'"),
    (["profile", "--threads", "0"], "argument --threads: must be > 0, got '0'"),
    (["profile", "--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["profile", "--model", "a", "--config", "b"], "argument --config: not allowed with argument "
                                                   "--model"),
    (["generate", "--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
    (["generate", "--max-tokens", "0"], "argument --max-tokens: must be > 0, got '0'"),
    (["bench", "--timeout", "-1"], "argument --timeout: must be > 0, got '-1'"),
    (["bench", "--rate", "1", "--rates", "1,2"], "argument --rates: not allowed with argument "
                                                 "--rate"),
    (["plan", "--budget", "nan"], "argument --budget: must be > 0, got 'nan'"),
])
def test_bad_flag_is_a_usage_error_naming_it(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("extra,message", [
    (["--layouts", "colocated,sideways"],
     "--layouts: unknown value 'sideways'; expected colocated, disaggregated"),
    (["--max-num-seqs", "32,x"], "--max-num-seqs '32,x': 'x' is not an integer"),
    (["--tensor-parallel", "0"], "--tensor-parallel '0': values must be >= 1, got 0"),
    (["--speculative", "ngram"], "--speculative: unknown value 'ngram'; expected off or "
                                 "METHOD:K, e.g. ngram:4"),
    (["--max-ppl-increase", "lots"], "--max-ppl-increase 'lots': expected a fraction (0.01), a "
                                     "percentage (1%) or none"),
    (["--input-len", "inf"], "length distribution 'inf': arguments must be finite numbers"),
    (["--block-sizes", "16,7"], "--block-sizes '16,7': block sizes are powers of two up to "
                                "256, got 7"),
    (["--block-sizes", "512"], "--block-sizes '512': block sizes are powers of two up to 256, "
                               "got 512"),
    (["--max-num-batched-tokens", "1"], "--max-num-batched-tokens '1': values must be >= 16, "
                                        "got 1"),
    (["--tensor-parallel", "3,5"], "--tensor-parallel '3,5': llama-3.1-8b splits over none of "
                                   "these (32 attention heads, 8 KV heads, intermediate size "
                                   "14336)"),
    (["--max-replicas", "50000"], "--max-replicas 50000: a pool holds at most 10000 replicas"),
])
def test_plan_search_space_values_are_checked(tmp_path, capsys, extra, message):
    rc = main(["plan", "--shape", "llama-3.1-8b", "--rate", "1", "--hardware", "h100-sxm:2",
               "--quiet", "--db", str(tmp_path / "p.db"), *extra])
    assert rc == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(["plan", "--shape", "llama-3.1-8b", "--rate", "1", "--hardware", "h100-sxm:2",
                 "--db", str(tmp_path / "p.db"), "--out", str(f)]) == 2
    assert capsys.readouterr().err == f"error: --out {f}: is a file; --out takes a directory\n"
    assert main(["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--num-requests", "2",
                 "--db", str(tmp_path / "p.db"), "--out", str(f)]) == 2
    assert f"--out {f}: is a file" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path}: is a directory; give a file name\n"


# -- profile database -----------------------------------------------------------------
def test_unusable_profile_db_paths(tmp_path, capsys):
    not_db = tmp_path / "notes.db"
    not_db.write_text("hello\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = {not_db: f"{not_db}: cannot open the profile database: file is not a database",
             blocker / "p.db": f"{blocker / 'p.db'}: cannot create its directory: a file in "
                               f"{blocker} is not a directory",
             tmp_path: f"{tmp_path}: is a directory; the profile database is a file "
                       "(e.g. profiles.db)"}
    for path, message in cases.items():
        with pytest.raises(ProfileDBError) as e:
            ProfileDB(path)
        assert str(e.value) == message
        assert main(["profile", "--list", "--db", str(path)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def test_profile_db_in_a_missing_directory_is_created(tmp_path, capsys):
    path = tmp_path / "new" / "deeper" / "p.db"
    assert main(["profile", "--list", "--json", "--db", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["db"] == str(path) and path.is_file()
    assert {h["key"] for h in out["hardware"]} >= {"h100-sxm", "l40s"}


def test_profile_bad_config_makes_no_database(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models: [\n")
    db = tmp_path / "p.db"
    assert main(["profile", "--fast", "--config", str(cfg), "--db", str(db)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {cfg}: invalid YAML: ")
    assert not db.exists()


# -- endpoints and clusters -----------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_addresses_fail_at_once(capsys):
    port = _closed_port()
    addr = f"127.0.0.1:{port}"
    assert main(["bench", "--url", f"http://{addr}", "--num-requests", "1"]) == 1
    assert capsys.readouterr().err.startswith(
        f"error: --url http://{addr}: nothing answers at {addr} (")
    assert main(["status", "--address", addr]) == 1
    assert "cannot connect to the Ray cluster: nothing answers at" in capsys.readouterr().err
    assert main(["deploy", GPU_CFG, "--address", addr]) == 1
    assert "cannot connect to the Ray cluster" in capsys.readouterr().err
    # a dry run needs no cluster: the file and its checkpoints are checked, the
    # comparison skipped
    local = "deploy/configs/local.yaml"
    assert main(["deploy", local, "--address", addr, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"{local}: valid; no Ray cluster to compare")
    assert main(["deploy", "--config", local, "--address", addr, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"{local}: valid; no Ray cluster to compare")
    # a checkpoint this machine cannot read: refused, as the deploy itself would
    assert main(["deploy", GPU_CFG, "--address", addr, "--dry-run"]) == 1
    assert capsys.readouterr().err.startswith(
        f"error: {GPU_CFG}: model 'llama-3-8b-instruct': checkpoint directory "
        "/models/Meta-Llama-3-8B-Instruct does not exist")


def test_deploy_needs_one_config(capsys):
    assert main(["deploy", "--dry-run"]) == 2
    assert "error: deploy needs an operator YAML" in capsys.readouterr().err
    assert main(["deploy", GPU_CFG, "--config", "other.yaml", "--dry-run"]) == 2
    assert f"error: two configs given: {GPU_CFG} and --config other.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["bench", "--url", "localhost:8000"],
     "--url 'localhost:8000': expected http://HOST[:PORT] or https://..."),
    (["bench", "--grpc", "localhost"], "--grpc 'localhost': expected HOST:PORT, e.g. "
                                       "127.0.0.1:50051"),
    (["status", "--address", "headnode"], "cannot connect to the Ray cluster: 'headnode' is not "
                                          "HOST:PORT (e.g. 10.0.0.1:6379)"),
])
def test_malformed_addresses(capsys, argv, message):
    assert main(argv) in (1, 2)
    assert capsys.readouterr().err == f"error: {message}\n"


def test_generate_on_a_missing_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(["generate", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("error: --device cuda: no CUDA device on this machine "
                                       "(use --device cpu)\n")


# -- interrupted runs leave no partial output -----------------------------------------
def test_profile_rows_land_all_at_once_or_not_at_all(tmp_path):
    from splitserve.cluster.cli.common import Interrupted
    from splitserve.cluster.cli.planning import staged_copy
    from splitserve.cluster.planning.shapes import PRESETS

    path = tmp_path / "p.db"
    before = ProfileDB(path)
    keys = before.hardware_keys()
    with pytest.raises(Interrupted):
        with staged_copy(before) as staged:
            staged.put_model(PRESETS["llama-3.1-8b"])
            raise Interrupted(signal.SIGINT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.db"]  # no staged copy left
    db = ProfileDB(path)
    assert db.model("llama-3.1-8b") is None and db.hardware_keys() == keys
    with staged_copy(db) as staged:
        staged.put_model(PRESETS["llama-3.1-8b"])
    assert ProfileDB(path).model("llama-3.1-8b") is not None


def test_signal_while_outputs_are_written_waits_for_them(tmp_path):
    from splitserve.cluster.cli.common import Interrupted, interrupts_deferred

    out = tmp_path / "record.json"
    with pytest.raises(Interrupted):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            out.write_text("whole")
    assert out.read_text() == "whole"


def test_bad_catalog_file_is_one_line(tmp_path, capsys):
    cat = tmp_path / "catalog.yaml"
    cat.write_text("gpus: [\n  - x: 1\n")
    assert main(["profile", "--catalog", str(cat), "--list", "--db", str(tmp_path / "p.db")]) == 2
    assert capsys.readouterr().err == (f"error: {cat}: invalid YAML: line 2, column 3: expected "
                                       "the node content, but found '-'\n")
    assert main(["profile", "--catalog", str(tmp_path / "none.yaml"), "--list",
                 "--db", str(tmp_path / "p.db")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'none.yaml'}: cannot read the "
                                       "catalog: No such file or directory\n")
