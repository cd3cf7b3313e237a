"""``splitserve profile``: the engine's steps measured over a grid of mixes,
each row stating the mix the step really ran; perplexity through the
engine's prompt-scoring path; the rows land in the database as measured."""

import json
import math

import pytest

from splitserve.cluster.planning import profile_run, profiler
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.records import MEASURED, chunk_attn
from splitserve.engine.config import EngineConfig
from splitserve.engine.default_model import default_model_path
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams

TINY = profiler.Grid(prefill_tokens=(0, 16), cached_tokens=(0, 32), decode_seqs=(0, 2),
                     decode_lengths=(20,), repeats=1)


@pytest.fixture(scope="module")
def model_dir():
    return str(default_model_path())


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine(EngineConfig(model=model_dir, num_blocks=256, block_size=16, max_num_seqs=8,
                                  max_num_batched_tokens=128))


def test_rows_state_the_mix_each_step_ran(engine):
    rows = profiler.profile_steps(engine, TINY)
    mixes = [(r.prefill_tokens, r.prefill_attn, r.decode_seqs) for r in rows]
    assert mixes == [
        (0, 0.0, 2),
        (16, chunk_attn(16, 0), 0),
        (16, chunk_attn(16, 0), 2),
        (16, chunk_attn(16, 32), 0),  # 32 tokens came from the prefix cache
        (16, chunk_attn(16, 32), 2),
    ]
    # two sequences at length 20 (19 prompt + 1 sampled token); caching the
    # prefix first takes them a step or two further
    assert [r.decode_context for r in rows[:3]] == [40, 0, 40]
    assert 40 < rows[4].decode_context <= 46
    assert all(r.step_s > 0 and r.repeats == 1 for r in rows)
    assert not engine.requests and engine.kv.all_free()  # nothing left behind


def test_perplexity_is_the_mean_prompt_logprob(engine):
    text = "the harbour town woke slowly and the gulls rose above the quay"
    ppl, n = profiler.perplexity(engine, text)
    ids = engine.tokenize(text)
    r = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    lps = [lp.logprob for lp in r.prompt_logprobs[1:]]
    assert n == len(ids) - 1 == len(lps)
    assert ppl == pytest.approx(math.exp(-sum(lps) / len(lps)))


def test_profile_writes_measured_rows(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(profiler, "FAST_GRID", TINY)
    db = ProfileDB(tmp_path / "p.db")
    target = profile_run.targets(model_dir, None)[0]
    summary = profile_run.run(db, target, fast=True, threads=1, log=lambda s: None)
    hw = db.hardware(summary["hardware"])
    assert hw.provenance == MEASURED and hw.key.startswith("cpu:") and hw.key.endswith(":1")
    rows = db.step_samples(summary["model_key"], hw.key)
    assert len(rows) == summary["rows"] == 5
    assert db.startup_s(summary["model_key"], hw.key)[1] == MEASURED
    assert db.quality(summary["model_key"])[0]["metric"] == "perplexity"
    assert summary["perplexity"] > 1


def test_cli_profile_list(tmp_path, capsys):
    from splitserve.cluster.cli.main import main

    assert main(["profile", "--list", "--json", "--db", str(tmp_path / "p.db")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {h["key"] for h in out["hardware"]} >= {"h100-sxm", "h200", "a100-80gb", "l40s", "mi300x"}
    assert all(h["provenance"] == "derived" for h in out["hardware"])
