"""``splitserve plan`` on the command line: files written, and re-planning
from a bench record against the current config proposes a change as a
YAML diff."""

import json

import numpy as np
import yaml

from splitserve.cluster.cli.main import main
from splitserve.cluster.config import load_config

SMALL = ["--max-num-seqs", "64", "--max-num-batched-tokens", "2048", "--block-sizes", "16",
         "--kv-dtypes", "auto", "--weight-dtypes", "bfloat16", "--tensor-parallel", "1",
         "--speculative", "off", "--policies", "cost", "--local-prefill", "0",
         "--autoscaling", "fixed", "--max-replicas", "3", "--finalists", "4", "--max-sims", "8",
         "--sim-requests", "120", "--quiet"]

CURRENT = {
    "name": "running",
    "models": [{"model": {"name": "chat", "path": "/models/chat", "dtype": "bfloat16",
                          "kv_cache_memory_gb": 20, "max_num_seqs": 64,
                          "max_num_batched_tokens": 2048, "device": "cuda"},
                "mode": "colocated",
                "decode": {"min_replicas": 3, "max_replicas": 3, "num_gpus": 1,
                           "autoscaling": None}}],
    "endpoints": {"host": "0.0.0.0", "http_port": 8080},
    "auth": {"api_keys_env": "CHAT_API_KEYS"},
    "slo": {"ttft_s": 0.4, "tpot_s": 0.02},
}


def bench_record(path, n=300, rate=6.0, seed=1):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    ins = np.clip(rng.lognormal(7.0, 0.5, n), 64, 4000).astype(int)
    outs = np.clip(rng.lognormal(4.5, 0.5, n), 4, 400).astype(int)
    rows = [{"index": i, "prompt_len": int(a), "output_len": int(b), "output_tokens": int(b),
             "send_time": 1000.0 + float(s), "ttft": 0.1, "e2e": 1.0}
            for i, (s, a, b) in enumerate(zip(t, ins, outs))]
    path.write_text(json.dumps({"benchmark": "splitserve-bench", "config": {},
                                "runs": [{"series": "chat", "rate": rate, "requests": rows}]}))


def test_plan_writes_yaml_json_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["plan", "--shape", "llama-3.1-8b", "--hardware", "l40s:3", "--hardware",
               "a100-80gb:2", "--rate", "6", "--input-len", "lognormal:7.0:0.5:64:4000",
               "--output-len", "lognormal:4.5:0.5:4:400", "--ttft", "400ms@p90", "--tpot",
               "20ms@p90", "--db", str(tmp_path / "p.db"), "--out", str(out)] + SMALL)
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "search space" in text and "Pareto front" in text and "Chosen:" in text
    cfg = load_config(out / "plan.yaml")
    assert cfg.slo.ttft_s == 0.4
    rec = json.loads((out / "plan.json").read_text())
    assert rec["counts"]["space"]["deployable"] == 21
    assert rec["chosen"]["simulated"]["meets_slo"]
    assert (out / "pareto.png").stat().st_size > 0


def test_replan_from_bench_record_proposes_a_diff(tmp_path, capsys):
    current = tmp_path / "current.yaml"
    current.write_text(yaml.safe_dump(CURRENT))
    bench = tmp_path / "bench.json"
    bench_record(bench)
    out = tmp_path / "replan"
    rc = main(["plan", "--current", str(current), "--shape", "llama-3.1-8b", "--observed",
               str(bench), "--hardware", "l40s:3", "--hardware", "a100-80gb:2",
               "--current-hardware", "a100-80gb", "--db", str(tmp_path / "p.db"),
               "--out", str(out), "--no-plot"] + SMALL)
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "Current config" in text
    assert "Proposed change:" in text  # 3 A100s colocated for ~6 req/s: a cheaper plan exists
    diff = (out / "plan.diff").read_text()
    assert diff.startswith("---") and "+++ plan.yaml (proposed)" in diff
    new = load_config(out / "plan.yaml")
    # keys the plan does not decide are kept from the current file
    assert new.name == "running" and new.endpoints.http_port == 8080
    assert new.models[0].model.name == "chat" and new.models[0].model.path == "/models/chat"
    rec = json.loads((out / "plan.json").read_text())
    assert rec["proposal"]["change"]
    assert rec["chosen"]["cost_per_hour"] < rec["current"]["cost_per_hour"]
