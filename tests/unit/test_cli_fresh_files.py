"""Files a new user writes by hand, fed to the ``splitserve`` commands:
what an editor or a spreadsheet adds (a byte-order mark, CRLF line ends, no
final newline) is read as the user meant it; what cannot be right (an
infinite or absurdly large token count, a trace spanning centuries, a
foreign SQLite file, a bench record of another shape) ends with status 2 and
one line naming the file, line and field, never a traceback or a run that
does not end."""

import json
import sqlite3

import pytest

from splitserve.cluster.cli.main import main
from splitserve.cluster.planning.workload import read_trace
from tests.unit.test_cli_inputs import check_bad_trace

GPU_CFG = "deploy/configs/gpu-llama3-8b.yaml"
H100 = ["--shape", "llama-3.1-8b", "--hardware", "h100-sxm"]
ROW = '{"timestamp": 0, "input_length": 100, "output_length": 10}'
ROW2 = '{"timestamp": 1000, "input_length": 600, "output_length": 10, "hash_ids": [7, 8]}'
AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens"


# -- traces that must work ------------------------------------------------------------
@pytest.mark.parametrize("name,content", [
    ("bom.jsonl", f"\ufeff{ROW}\n{ROW2}\n"),
    ("crlf.jsonl", f"{ROW}\r\n{ROW2}\r\n"),
    ("no-final-newline.jsonl", f"{ROW}\n\n{ROW2}"),
    ("bom.csv", f"\ufeff{AZURE}\r\n0,100,10\r\n1,600,10"),
    ("blank-line.csv", f"{AZURE}\n0,100,10\n\n1,600,10\n"),
])
def test_editor_artifacts_in_a_trace_are_read(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8"))
    reqs = list(read_trace(p))
    assert [(r.arrival_s, r.input_len, r.output_len) for r in reqs] == [(0.0, 100, 10),
                                                                         (1.0, 600, 10)]


# -- traces that must fail, at once ------------------------------------------------------
@pytest.mark.parametrize("name,content,message", [
    ("t.jsonl", f'{ROW}\n{{"timestamp": 5, "input_length": Infinity, "output_length": 1}}\n',
     "t.jsonl line 2: 'input_length' must be an integer >= 1, got inf"),
    ("t.jsonl", f'{ROW}\n{{"timestamp": 5, "input_length": 1, "output_length": NaN}}\n',
     "t.jsonl line 2: 'output_length' must be an integer >= 1, got nan"),
    ("t.jsonl", f'{ROW}\n{{"timestamp": 5, "input_length": 1e30, "output_length": 1}}\n',
     "t.jsonl line 2: 'input_length' 1e+30 is over 16777216 tokens, longer than any model's "
     "context"),
    ("t.jsonl", f'{ROW}\n{{"timestamp": 1e300, "input_length": 1, "output_length": 1}}\n',
     "t.jsonl line 2: timestamp 1e+300 ms is more than 366 days after the first request's; "
     "timestamps are milliseconds from the trace's start"),
    ("t.csv", f"{AZURE}\n0,100,10\n1,99999999999999999999,10\n",
     "t.csv line 3: ContextTokens 99999999999999999999 is over 16777216 tokens, longer than "
     "any model's context"),
    ("t.csv", f"{AZURE}\n0,100,10\n1e300,100,10\n",
     "t.csv line 3: TIMESTAMP 1e300 is more than 366 days after the first request's; "
     "TIMESTAMP is seconds or a date-time"),
])
def test_absurd_trace_numbers_name_the_line(tmp_path, capsys, name, content, message):
    check_bad_trace(tmp_path, capsys, name, content.encode(), message)


# -- length distributions and ShareGPT files ----------------------------------------------
@pytest.mark.parametrize("spec,message", [
    ("lognormal:1000:1", "length distribution 'lognormal:1000:1': its median exp(1000) is over "
                         "16777216 tokens"),
    ("uniform:1:1e30", "length distribution 'uniform:1:1e30': lengths must be <= 16777216 tokens"),
    ("normal:1e12:5", "length distribution 'normal:1e12:5': lengths must be <= 16777216 tokens"),
    ("99999999999", "length distribution '99999999999': lengths must be <= 16777216 tokens"),
])
def test_length_distribution_beyond_any_context_is_refused(tmp_path, capsys, spec, message):
    rc = main(["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--num-requests", "2",
               "--input-len", spec, "--db", str(tmp_path / "p.db")])
    assert rc == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_sharegpt_file_with_a_byte_order_mark_is_read(tmp_path):
    from splitserve.cluster.bench.datasets import load_sharegpt

    conv = {"conversations": [{"from": "human", "value": "a prompt of some twenty characters"},
                              {"from": "gpt", "value": "and a reply of some more characters"}]}
    p = tmp_path / "sharegpt.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps([conv]).encode())
    (req,) = load_sharegpt(p, 1)
    assert req.prompt == "a prompt of some twenty characters" and req.output_len == 9


# -- bench records given to plan --observed -------------------------------------------------
def _row(t, **kw):
    return {"send_time": t, "prompt_len": 50, "output_len": 20, "output_tokens": 20, **kw}


@pytest.mark.parametrize("content,message", [
    (b'{"runs": {"a": 1}}', "'runs' must be a list of runs, got dict"),
    (b'{"runs": [5]}', "run -1 is not an object (got int)"),
    (b'{"runs": [{"requests": [1, 2]}]}', "run -1, request 0: not an object (got int)"),
    (json.dumps({"runs": [{"requests": [_row(0), {"prompt_len": 5}]}]}).encode(),
     "run -1, request 1: missing 'send_time'"),
    (json.dumps({"runs": [{"requests": [_row(0), _row("soon")]}]}).encode(),
     "run -1, request 1: 'send_time' must be a finite number, got 'soon'"),
    (json.dumps({"runs": [{"requests": [_row(0), _row(1, prompt_len=-3)]}]}).encode(),
     "run -1, request 1: 'prompt_len' must be an integer >= 0, got -3"),
    (json.dumps({"runs": [{"requests": [_row(0)]}]}).encode(),
     "run -1 has 1 request row; a workload needs at least 2"),
    (b"\xff\xfe{}", "cannot read the bench record: not UTF-8 text (byte 0xff)"),
    (b'{"runs": [', "cannot read the bench record: not JSON: Expecting value (line 1, column 11)"),
])
def test_malformed_bench_record_names_run_and_request(tmp_path, capsys, content, message):
    p = tmp_path / "bench.json"
    p.write_bytes(content)
    rc = main(["plan", "--shape", "llama-3.1-8b", "--observed", str(p), "--hardware",
               "h100-sxm:2", "--quiet", "--db", str(tmp_path / "p.db")])
    assert (rc, capsys.readouterr().err) == (2, f"error: {p}: {message}\n")


def test_bench_record_with_a_byte_order_mark_is_read(tmp_path):
    from splitserve.cluster.planning.planner.inputs import from_bench_record

    p = tmp_path / "bench.json"
    rows = [_row(0.0), _row(0.5, output_tokens=None), _row(1.0)]
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"runs": [{"requests": rows}]}).encode())
    wl = from_bench_record(p)
    assert list(wl.inputs) == [50, 50, 50] and list(wl.outputs) == [20, 20, 20]


# -- profile databases ----------------------------------------------------------------------
def _sqlite(path, *statements):
    conn = sqlite3.connect(path)
    for s in statements:
        conn.execute(s)
    conn.commit()
    conn.close()


def _tables(path):
    conn = sqlite3.connect(path)
    try:
        return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master "
                                                 "WHERE type = 'table'"))
    finally:
        conn.close()


def test_another_applications_sqlite_file_is_refused_untouched(tmp_path, capsys):
    p = tmp_path / "notes.sqlite"
    _sqlite(p, "CREATE TABLE notes (id INTEGER, body TEXT)")
    assert main(["profile", "--list", "--db", str(p)]) == 2
    assert capsys.readouterr().err == (
        f"error: {p}: an SQLite database of something else (tables: notes), not a profile "
        "database; give --db a new file or a profile database\n")
    assert _tables(p) == ["notes"]


def test_profile_table_without_its_columns_is_one_line(tmp_path, capsys):
    p = tmp_path / "odd.db"
    _sqlite(p, "CREATE TABLE hardware (id INTEGER, what TEXT)")
    assert main(["profile", "--list", "--db", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}: table hardware lacks the columns key, name, provenance, ")
    assert err.endswith("; not a profile database, or a damaged one: give --db another file\n")
    # a version-2 file that lost a column reads the same way, on plan and simulate too
    q = tmp_path / "damaged.db"
    _sqlite(q, "PRAGMA user_version = 2",
            "CREATE TABLE startup (id INTEGER PRIMARY KEY, model_id INTEGER)")
    for argv in (["profile", "--list"], ["plan", "--shape", "llama-3.1-8b", "--rate", "1"],
                 ["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--num-requests", "1"]):
        assert main([*argv, "--db", str(q)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {q}: table startup lacks the columns "
                                                  "hardware_key, seconds, provenance, host")


def test_empty_file_and_older_version_are_profile_databases(tmp_path, capsys):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert main(["profile", "--list", "--json", "--db", str(empty)]) == 0
    assert "h100-sxm" in capsys.readouterr().out
    from splitserve.cluster.planning.db_schema import SCHEMA

    v1 = tmp_path / "v1.db"  # a version-1 file: every table but speculation
    conn = sqlite3.connect(v1)
    conn.executescript(SCHEMA.split("CREATE TABLE IF NOT EXISTS speculation")[0])
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    assert main(["profile", "--list", "--db", str(v1)]) == 0
    assert "speculation" in _tables(v1)


# -- simulate's workload and seeds ------------------------------------------------------------
def test_simulate_with_no_request_says_so(tmp_path, capsys):
    out = tmp_path / "sim"
    rc = main(["simulate", "--config", GPU_CFG, *H100, "--rate", "0.001", "--duration", "1",
               "--db", str(tmp_path / "p.db"), "--out", str(out)])
    assert (rc, capsys.readouterr().err) == (
        2, "error: no request arrives: --rate 0.001 over --duration 1 s brings none; raise "
           "--rate or --duration\n")
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["simulate", "--config", GPU_CFG, "--rate", "1", "--num-requests", "1"],
    ["plan", "--shape", "llama-3.1-8b", "--rate", "1"],
    ["bench", "--num-requests", "1"],
])
def test_negative_seed_is_a_usage_error_naming_the_flag(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--seed", "-1"])
    assert e.value.code == 2
    assert "argument --seed: must be >= 0, got '-1'" in capsys.readouterr().err


def test_same_seed_same_simulation_other_seed_another(tmp_path, capsys):
    def run(seed):
        argv = ["simulate", "--config", GPU_CFG, *H100, "--rate", "20", "--num-requests", "30",
                "--seed", str(seed), "--db", str(tmp_path / "p.db"), "--json"]
        assert main(argv) == 0
        rec = json.loads(capsys.readouterr().out)
        return rec["summary"]

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c


# -- operator YAML ----------------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ("models:\n  - prefill: {max_replica: 3}\n",
     "models.0.prefill.max_replica (line 2, column 15): Extra inputs are not permitted (did "
     "you mean 'max_replicas'?)"),
    ("models:\n  - model: {name: a, max_num_seq: 4}\n",
     "models.0.model.max_num_seq (line 2, column 22): Extra inputs are not permitted (did you "
     "mean 'max_num_seqs'?)"),
    ("endpoint: {http_port: 8001}\n",
     "endpoint (line 1, column 1): Extra inputs are not permitted (did you mean 'endpoints'?)"),
    ("zzz: 1\n", "zzz (line 1, column 1): Extra inputs are not permitted"),
])
def test_typo_in_a_key_suggests_the_key(tmp_path, capsys, content, message):
    p = tmp_path / "cluster.yaml"
    p.write_text(content)
    assert main(["serve", "--config", str(p), "--print-config"]) == 2
    assert capsys.readouterr().err == f"error: {p}: {message}\n"


def test_operator_yaml_from_a_windows_editor_is_read(tmp_path, capsys):
    p = tmp_path / "cluster.yaml"
    p.write_bytes(b"\xef\xbb\xbfname: win\r\nmodels:\r\n  - model:\r\n      name: default")
    assert main(["serve", "--config", str(p), "--print-config"]) == 0
    assert "name: win\n" in capsys.readouterr().out


# -- hardware catalog -------------------------------------------------------------------------
def _catalog(tmp_path, old, new):
    from splitserve.cluster.planning.hardware import CATALOG_PATH

    text = CATALOG_PATH.read_text()
    assert old in text
    p = tmp_path / "catalog.yaml"
    p.write_text(text.replace(old, new))
    return p


@pytest.mark.parametrize("old,new,message", [
    ("  matmul: 0.6 ", "  matmul: lots ", "efficiency.matmul must be a number, got 'lots'"),
    ("  matmul: 0.6 ", "  matmul: -2 ", "efficiency.matmul must be in (0, 1], got -2.0"),
    ("  matmul: 0.6 ", "  matmul_share: 0.6 ",
     "efficiency: unknown key 'matmul_share'; the keys are matmul, memory, network, "
     "tensor_parallel, step_overhead_s, load_bytes_per_s, startup_fixed_s"),
    ("  memory: 0.8 ", "  memroy: 0.8 ",
     "efficiency: unknown key 'memroy' (did you mean 'memory'?); the keys are matmul, memory, "
     "network, tensor_parallel, step_overhead_s, load_bytes_per_s, startup_fixed_s"),
    ("    source: NVIDIA H200", "    sorce: NVIDIA H200",
     "gpus.h200: unknown key 'sorce' (did you mean 'source'?); the keys are name, peak_flops, "
     "memory_bandwidth, memory_bytes, intra_node_bandwidth, network_bandwidth, source"),
    ("    memory_bytes: 48.0e9\n", "    memory_bytes: 48.0e9\n    price_per_hour: 1.2\n",
     "gpus.l40s: unknown key 'price_per_hour' (a GPU's price goes under prices.per_gpu_hour); "
     "the keys are name, peak_flops, memory_bandwidth, memory_bytes, intra_node_bandwidth, "
     "network_bandwidth, source"),
    ("    h100-sxm: 2.99", "    h100-sxm: cheap",
     "prices.per_gpu_hour.h100-sxm must be a number >= 0, got 'cheap'"),
    ("    memory_bandwidth: 3.35e12", "    memory_bandwidth: .nan",
     "gpus.h100-sxm: 'memory_bandwidth' must be a finite number, got nan"),
    ("  h100-sxm:\n    name: NVIDIA H100 SXM5 80GB", "  h100-sxm: 5\n  h100-old:\n    name: x",
     "gpus.h100-sxm: expected a mapping of figures, got int"),
])
def test_bad_catalog_values_are_one_line(tmp_path, capsys, old, new, message):
    p = _catalog(tmp_path, old, new)
    db = tmp_path / "p.db"
    assert main(["profile", "--catalog", str(p), "--list", "--db", str(db)]) == 2
    assert capsys.readouterr().err == f"error: {p}: {message}\n"


def test_catalog_whose_gpus_are_a_list_is_one_line(tmp_path, capsys):
    p = tmp_path / "catalog.yaml"
    p.write_text("gpus: [h100-sxm]\n")
    assert main(["profile", "--catalog", str(p), "--list", "--db", str(tmp_path / "p.db")]) == 2
    assert capsys.readouterr().err == (f"error: {p}: gpus: expected a mapping of key -> figures, "
                                       "got list\n")


# -- output paths ------------------------------------------------------------------------------
def test_output_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    # the run itself would fail at t = 1 s (no such pool): the --out message comes first
    assert main(["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--num-requests", "5",
                 "--failure", "1:nopool", "--db", str(tmp_path / "p.db"),
                 "--out", str(blocker / "sim")]) == 2
    assert capsys.readouterr().err == (f"error: --out {blocker / 'sim'}: {blocker} is a file, "
                                       "not a directory\n")
    # bench checks its outputs before it looks for the endpoint (none listens on port 9)
    assert main(["bench", "--url", "http://127.0.0.1:9", "--num-requests", "1",
                 "--plot", str(blocker / "deep" / "p.png")]) == 2
    assert capsys.readouterr().err == (f"error: --plot {blocker / 'deep' / 'p.png'}: {blocker} "
                                       "is a file, not a directory\n")
    assert main(["plan", "--shape", "llama-3.1-8b", "--rate", "1", "--hardware", "h100-sxm:2",
                 "--db", str(tmp_path / "p.db"), "--out", str(blocker / "plan")]) == 2
    assert capsys.readouterr().err == (f"error: --out {blocker / 'plan'}: {blocker} is a file, "
                                       "not a directory\n")


def test_output_in_missing_folders_is_written(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "sim"
    assert main(["simulate", "--config", GPU_CFG, *H100, "--rate", "5", "--num-requests", "3",
                 "--db", str(tmp_path / "p.db"), "--no-plot", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["record.json", "requests.csv"]


def test_profile_inputs_for_speculation_are_checked_before_measuring(tmp_path, capsys):
    db = tmp_path / "p.db"
    missing = tmp_path / "answers.txt"
    assert main(["profile", "--speculation", "--fast", "--spec-text", str(missing),
                 "--db", str(db)]) == 2
    assert capsys.readouterr().err == (f"error: --spec-text {missing}: cannot read: No such file "
                                       "or directory\n")
    binary = tmp_path / "answers.bin"
    binary.write_bytes(b"ok\n\xff\xfe")
    assert main(["profile", "--speculation", "--fast", "--spec-text", str(binary),
                 "--db", str(db)]) == 2
    assert capsys.readouterr().err == (f"error: --spec-text {binary}: not UTF-8 text (byte 0xff)\n")
    assert main(["profile", "--speculation", "--fast", "--spec-draft", str(tmp_path / "draft"),
                 "--db", str(db)]) == 2
    assert capsys.readouterr().err == (f"error: --spec-draft {tmp_path / 'draft'}: no such "
                                       "checkpoint folder\n")
    assert not db.exists()


@pytest.mark.parametrize("flag,message", [
    ("--failure=nan:decode", "--failure 'nan:decode': TIME must be a finite number of seconds "
                             ">= 0 and COUNT an integer >= 1"),
    ("--failure=-5:decode", "--failure '-5:decode': TIME must be a finite number of seconds "
                            ">= 0 and COUNT an integer >= 1"),
    ("--failure=5:decode:-1", "--failure '5:decode:-1': TIME must be a finite number of seconds "
                              ">= 0 and COUNT an integer >= 1"),
])
def test_failure_out_of_range_names_the_flag(tmp_path, capsys, flag, message):
    rc = main(["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--num-requests", "2",
               flag, "--db", str(tmp_path / "p.db")])
    assert (rc, capsys.readouterr().err) == (2, f"error: {message}\n")


def test_draft_cost_ratio_must_be_finite(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--config", GPU_CFG, "--rate", "1", "--num-requests", "1",
              "--draft-cost-ratio", "nan"])
    assert "argument --draft-cost-ratio: must be >= 0, got 'nan'" in capsys.readouterr().err


# -- model folders ----------------------------------------------------------------------
@pytest.mark.parametrize("config,message", [
    ("[]", "cannot read the model shape: {d}/config.json: expected a JSON object, got list"),
    ('{"architectures": "LlamaForCausalLM"}',
     "cannot read the model shape: {d}/config.json: 'architectures' must be a list of class "
     "names, got str 'LlamaForCausalLM'"),
    ("{}", "cannot read the model shape: {d}/config.json: no 'architectures' list, so no model "
           "class to load (a Hugging Face config.json names it)"),
    (None, "cannot read the model shape: {d}: model config config.json not found"),
])
def test_a_model_folder_without_a_usable_config_is_one_line(tmp_path, capsys, config, message):
    d = tmp_path / "model"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config)
    db = tmp_path / "p.db"
    for argv in (["profile", "--model", str(d), "--fast", "--db", str(db)],
                 ["plan", "--model", str(d), "--rate", "1", "--hardware", "h100-sxm:2",
                  "--db", str(tmp_path / "plan.db")]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: {message.format(d=d)}\n"
    assert not db.exists()  # profile checks the folder before creating its database


def test_profile_of_a_corrupt_safetensors_header_is_one_line(tmp_path, capsys):
    """The engine's checkpoint error, not a traceback; the database this run
    would have created is not left behind."""
    import shutil
    import struct

    from splitserve.engine.default_model import default_model_path

    d = tmp_path / "model"
    shutil.copytree(default_model_path(), d)
    weights = d / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 1 << 62) + weights.read_bytes()[8:64])
    db = tmp_path / "p.db"
    assert main(["profile", "--model", str(d), "--fast", "--no-quality", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: {weights}: unreadable safetensors file: Error while "
                        "deserializing header: header too large\n"), err
    assert not db.exists()


# -- workload flags that cannot apply -----------------------------------------------------
SAMPLE = "cluster/planning/samples/mooncake_sample.jsonl"


@pytest.mark.parametrize("argv,message", [
    (["simulate", "--config", GPU_CFG, *H100, "--trace", SAMPLE, "--input-len", "100",
      "--burstiness", "2"],
     "--input-len, --burstiness: synthetic arrivals only; a --trace brings its own lengths and "
     "arrival times"),
    (["plan", "--shape", "llama-3.1-8b", "--hardware", "h100-sxm:2", "--trace", SAMPLE,
      "--prefix-groups", "4"],
     "--prefix-groups: synthetic arrivals only; a --trace brings its own lengths and arrival "
     "times"),
    (["simulate", "--config", GPU_CFG, *H100, "--rate", "1e-9", "--num-requests", "3"],
     "--num-requests 3 at --rate 1e-09 span about 3e+09 s, which is more than 366 days of "
     "arrivals"),
    (["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--duration", "1e12"],
     "--duration 1e+12 s is more than 366 days of arrivals"),
    (["plan", "--shape", "llama-3.1-8b", "--hardware", "h100-sxm:2", "--rate", "1e-9"],
     "--sim-requests 800 at --rate 1e-09 span about 8e+11 s, which is more than 366 days of "
     "arrivals"),
    # a curve, prefixes and a timeline step that cannot run (a division by zero, or no end)
    (["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--num-requests", "3",
      "--diurnal", "0:1:1"],
     "--diurnal '0:1:1': expected period > 0 and peak >= trough > 0, got period 0, peak 1, "
     "trough 1"),
    (["plan", "--shape", "llama-3.1-8b", "--hardware", "h100-sxm:2", "--rate", "1",
      "--diurnal", "100:1:nan"],
     "--diurnal '100:1:nan': period, peak and trough must be finite numbers"),
    (["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--num-requests", "3",
      "--prefix-groups", "999999999", "--prefix-tokens", "64"],
     "--prefix-groups must be from 1 to 1000000, got 999999999"),
    (["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--num-requests", "3",
      "--prefix-groups", "2", "--prefix-tokens", "99999999999"],
     "--prefix-tokens must be from 16 (one 16-token block) to 16777216, got 99999999999"),
    (["plan", "--shape", "llama-3.1-8b", "--hardware", "h100-sxm:2", "--rate", "1",
      "--prefix-tokens", "64"],
     "--prefix-tokens needs --prefix-groups: shared prefixes take both a count and a length"),
    (["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--num-requests", "3",
      "--sample-s", "1e-9"],
     "--sample-s 1e-09: the timeline's step is at least 0.001 s"),
    (["simulate", "--config", GPU_CFG, *H100, "--rate", "1", "--duration", "86400",
      "--sample-s", "0.001"],
     "--sample-s 0.001: 8.64e+07 timeline points over 86400 s of arrivals, more than 10000000; "
     "raise --sample-s"),
])
def test_workload_flags_that_cannot_apply_are_refused(tmp_path, capsys, argv, message):
    """A synthetic flag beside a trace was ignored; arrivals spread over
    centuries, a million prefix groups or a nanosecond timeline step
    simulated without end; a zero-length day divided by zero."""
    assert main([*argv, "--db", str(tmp_path / "p.db")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
