"""``splitserve bench`` against live endpoints on loopback: the OpenAI HTTP
API (uvicorn) and the gRPC API, both over real engines of a tiny
checkpoint. The server sees exactly the requests the workload describes,
and the JSON record, table and plot are well formed and agree with the
per-request measurements."""

import argparse
import asyncio
import json
import math

import pytest

from splitserve.cluster.cli import bench as cli_bench
from splitserve.cluster.api.backend import LocalBackend
from splitserve.cluster.bench.datasets import parse_length_dist, synthetic_requests
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.cluster.api.backend import DEFAULT_OPTIONS
from tests.integration.test_grpc_api import GrpcServerThread
from tests.integration.api_fixtures import KEY, url  # noqa: F401

MODEL = "tiny"


class Recording(LocalBackend):
    """The real LocalBackend, keeping what each request asked for."""

    def __init__(self, engines):
        super().__init__(engines)
        self.seen: list[tuple[list[int], int, bool, float]] = []

    async def generate(self, model, request_id, prompt_token_ids, params, options=DEFAULT_OPTIONS):
        self.seen.append((list(prompt_token_ids), params.max_tokens, params.ignore_eos,
                          params.temperature))
        async for out in super().generate(model, request_id, prompt_token_ids, params, options):
            yield out


@pytest.fixture(scope="module")
def local(tiny_llama):
    """The backend the endpoints serve, recording what each request asked for."""
    be = Recording({MODEL: LLMEngine(EngineConfig(model=str(tiny_llama), model_id=MODEL,
                                                  num_blocks=128, block_size=8))})
    yield be
    asyncio.run(be.close())


@pytest.fixture(scope="module")
def grpc_target(local):
    server = GrpcServerThread(local, api_keys=[KEY])
    yield server.target
    server.stop()


def bench(*argv) -> int:
    parser = argparse.ArgumentParser(prog="splitserve")
    cli_bench.add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--model", MODEL, "--api-key", KEY, "--no-progress", *argv])
    return args.func(args)


def check_record(path, runs: int, n: int, output_len: int) -> dict:
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "splitserve-bench" and len(rec["runs"]) == runs
    for run in rec["runs"]:
        s = run["stats"]
        assert (s["num_requests"], s["completed"], s["failed"]) == (n, n, 0)
        reqs = run["requests"]
        assert [r["index"] for r in reqs] == list(range(n))
        for r in reqs:
            assert r["error"] is None and r["output_tokens"] == output_len
            times = r["chunk_times"]
            assert times == sorted(times) and times[0] >= r["send_time"]
            assert r["ttft"] == pytest.approx(times[0] - r["send_time"])
            assert r["e2e"] == pytest.approx(times[-1] - r["send_time"])
        # the summary is computed from exactly these measurements
        assert s["ttft"]["mean"] == pytest.approx(sum(r["ttft"] for r in reqs) / n)
        assert s["e2e"]["count"] == n
        assert s["output_throughput"] == pytest.approx(n * output_len / s["duration_s"])
        assert 0 < s["request_throughput"] <= n / max(r["e2e"] for r in reqs)
    return rec


def test_http_sweep_record_table_and_plot(local, url, tmp_path, capsys):
    local.seen.clear()
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = bench("--url", url, "--rates", "50,inf", "--num-requests", "5",
               "--input-len", "uniform:8:24", "--output-len", "6", "--seed", "3",
               "--out", str(out), "--plot", str(png))
    assert rc == 0
    rec = check_record(out, runs=2, n=5, output_len=6)
    assert [r["rate"] for r in rec["runs"]] == [50.0, "inf"]
    # the server got exactly the prompts of runs 0 and 1 (seeds 3 and 4)
    want = [r.prompt for i in (0, 1) for r in synthetic_requests(
        5, parse_length_dist("uniform:8:24"), parse_length_dist("6"), seed=3 + i)]
    assert sorted(s[0] for s in local.seen) == sorted(want)
    assert {s[1:] for s in local.seen} == {(6, True, 0.0)}
    table = capsys.readouterr().out
    assert "50 req/s" in table and "unpaced" in table and "5 / 0" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a local backend sends no phase timings: no phase split is claimed
    assert all(math.isnan(v) if v is not None else True
               for run in rec["runs"] for v in run["stats"]["phases"].values())
    assert local.all_blocks_free()


def test_grpc_closed_loop(local, grpc_target, tmp_path):
    local.seen.clear()
    out = tmp_path / "grpc.json"
    rc = bench("--grpc", grpc_target, "--concurrency", "2", "--num-requests", "4",
               "--input-len", "12", "--output-len", "5", "--out", str(out))
    assert rc == 0
    rec = check_record(out, runs=1, n=4, output_len=5)
    assert rec["runs"][0]["concurrency"] == 2
    assert [len(s[0]) for s in local.seen] == [12] * 4
    # never more than 2 in flight: the 3rd request is sent after the 1st or 2nd ended
    reqs = rec["runs"][0]["requests"]
    ends = sorted(r["send_time"] + r["e2e"] for r in reqs)
    third = sorted(r["send_time"] for r in reqs)[2]
    assert third >= ends[0] - 1e-3


def test_sharegpt_over_http_and_refused_key(local, url, tiny_llama, tmp_path, capsys):
    convs = [[{"from": "human", "value": f"question {i}: " + "the quick brown fox " * (i + 2)},
              {"from": "gpt", "value": "an answer " * 4}] for i in range(4)]
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([{"id": str(i), "conversations": c} for i, c in enumerate(convs)]))
    local.seen.clear()
    out = tmp_path / "sg.json"
    rc = bench("--url", url, "--dataset", str(data), "--tokenizer", str(tiny_llama),
               "--num-requests", "3", "--output-len", "4", "--out", str(out))
    assert rc == 0
    rec = check_record(out, runs=1, n=3, output_len=4)
    # lengths counted with the model's tokenizer equal what the server tokenized
    lens = sorted(r["prompt_len"] for r in rec["runs"][0]["requests"])
    assert lens == sorted(len(s[0]) for s in local.seen)
    capsys.readouterr()
    # a wrong key: every request fails with the server's 401, the run reports it
    parser = argparse.ArgumentParser()
    cli_bench.add_subcommand(parser.add_subparsers())
    args = parser.parse_args(["bench", "--url", url, "--model", MODEL, "--api-key", "wrong",
                              "--num-requests", "2", "--input-len", "8", "--output-len", "2",
                              "--no-progress"])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "2 x HTTP 401: missing or invalid API key" in err
