import json
import math
import sys

from splitserve.cluster.bench import record
from splitserve.cluster.bench.report import table


def test_a_record_opens_with_what_ran_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/src/benchmarks/bench_x.py", "--out", "x.json"])
    path = tmp_path / "nested" / "x.json"
    rec = record.write_record(path, "x", {"tok_s": 12.5, "none": math.nan, "top": math.inf})
    back = json.loads(path.read_text())
    assert list(back) == ["benchmark", "time", "command", "git", "machine", "results"]
    assert back["benchmark"] == "x" and back["time"].endswith("Z")
    assert back["command"].split()[1:] == ["/src/benchmarks/bench_x.py", "--out", "x.json"]
    assert {"python", "platform", "cpus", "cpu"} <= set(back["machine"])
    assert back["results"] == {"tok_s": 12.5, "none": None, "top": "inf"}  # strict JSON
    assert rec["results"]["tok_s"] == 12.5


def test_no_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert record.write_record(None, "x", {})["results"] == {}
    assert list(tmp_path.iterdir()) == []


def test_the_console_command_is_named_as_typed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/splitserve", "bench", "--rates", "1,2"])
    assert record.command_line() == "splitserve bench --rates 1,2"


def test_write_json_takes_a_default_for_other_types(tmp_path):
    record.write_json(tmp_path / "r.json", {"at": tmp_path, "xs": (1.0, -math.inf)}, default=str)
    assert json.loads((tmp_path / "r.json").read_text()) == {"at": str(tmp_path), "xs": [1.0, "-inf"]}


def test_table_aligns_columns_under_a_rule():
    assert table([["a", 1.5], ["bbb", 20]], ["name", "value"]).splitlines() == [
        "name  value",
        "----  -----",
        "a     1.500",
        "bbb   20   ",
    ]
