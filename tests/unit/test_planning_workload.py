"""Workloads: the sample traces parse; malformed files fail naming the line;
prefix structure becomes shared block hashes; synthetic arrivals are
deterministic for a seed and follow their rate (and diurnal curve)."""

import math

import pytest

from splitserve.cluster.bench.datasets import parse_length_dist
from splitserve.cluster.planning import samples
from splitserve.cluster.planning.workload import (
    Diurnal,
    PrefixSpec,
    TraceError,
    TraceRequest,
    prompt_block_hashes,
    read_azure,
    read_mooncake,
    read_trace,
    synthetic,
)


def test_the_sample_traces_parse_and_are_what_the_generator_writes():
    assert samples.MOONCAKE.read_text() == "\n".join(samples.mooncake_lines()) + "\n"
    assert samples.AZURE.read_text() == "\n".join(samples.azure_lines()) + "\n"
    moon = list(read_trace(samples.MOONCAKE))
    az = list(read_trace(samples.AZURE))
    assert len(moon) == len(az) == 120
    assert moon[0] == TraceRequest(0.0, 747, 230, (0, 1))
    assert moon[1].arrival_s == pytest.approx(0.264) and moon[1].hash_ids == (0, 1, 1000)
    assert az[0].arrival_s == 0.0 and (az[0].input_len, az[0].output_len) == (809, 85)
    assert az[1].arrival_s == pytest.approx(0.368321, abs=1e-6)
    for trace in (moon, az):
        assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:]))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}\n'


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 2: not JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"input_length": 3, "output_length": 1}', "line 2: 'timestamp' (milliseconds) must be a finite number"),
    ('{"timestamp": 5, "output_length": 1}', "line 2: missing 'input_length'"),
    ('{"timestamp": 5, "input_length": 0, "output_length": 1}', "line 2: 'input_length' must be an integer >= 1"),
    ('{"timestamp": 5, "input_length": 3, "output_length": 1.5}', "line 2: 'output_length' must be an integer"),
    ('{"timestamp": 5, "input_length": 3, "output_length": 1, "hash_ids": ["a"]}', "line 2: 'hash_ids' must be a list of integers"),
    ('{"timestamp": 5, "input_length": 3, "output_length": 1, "hash_ids": [1, 2]}', "line 2: 2 hash_ids for 3 input tokens"),
    ('{"timestamp": -1, "input_length": 3, "output_length": 1}', "line 2: timestamp -1 is before the previous line's"),
])
def test_malformed_mooncake_lines_are_named(tmp_path, line, message):
    p = write(tmp_path, "t.jsonl", GOOD + line + "\n")
    with pytest.raises(TraceError) as e:
        list(read_mooncake(p))
    assert str(e.value).startswith(f"{p} line 2: ") and message in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("", "line 1: empty file"),
    ("TIME,ContextTokens,GeneratedTokens\n", "line 1: header lacks ['TIMESTAMP']"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,5,5\n2.0,x,5\n", "line 3: ContextTokens 'x' is not an integer"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,5,5\n2.0,5,0\n", "line 3: GeneratedTokens must be >= 1"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,5,5\n", "line 2: TIMESTAMP 'yesterday' is neither"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2.0,5,5\n1.0,5,5\n", "line 3: TIMESTAMP is before the previous row's"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2.0,5\n", "line 2: 2 fields, the header has 3"),
])
def test_malformed_azure_rows_are_named(tmp_path, text, message):
    p = write(tmp_path, "t.csv", text)
    with pytest.raises(TraceError) as e:
        list(read_azure(p))
    assert message in str(e.value) and str(p) in str(e.value)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(TraceError, match="unknown trace format '.txt'"):
        read_trace(tmp_path / "x.txt")
    with pytest.raises(TraceError, match="cannot read"):
        list(read_trace(tmp_path / "missing.jsonl"))


def test_shared_hash_ids_give_shared_block_hashes():
    a = TraceRequest(0.0, 1100, 1, (7, 8, 9))
    b = TraceRequest(0.0, 700, 1, (7, 8))
    c = TraceRequest(0.0, 700, 1, (5, 8))
    ha, hb, hc = (prompt_block_hashes(r, i, 16) for i, r in enumerate((a, b, c)))
    assert (len(ha), len(hb)) == (1100 // 16, 700 // 16)
    assert ha[:len(hb)] == hb  # b's prompt is a prefix of a's
    assert not set(hc) & set(ha)  # a different first block: nothing shared, not even later ids
    # prompts without ids share nothing
    u, v = TraceRequest(0.0, 64, 1), TraceRequest(0.0, 64, 1)
    assert prompt_block_hashes(u, 0, 16) != prompt_block_hashes(v, 1, 16)


def test_synthetic_is_deterministic_and_keeps_its_rate():
    dist = parse_length_dist("uniform:10:100")
    a = list(synthetic(20.0, dist, dist, seed=3, num_requests=4000))
    b = list(synthetic(20.0, dist, dist, seed=3, num_requests=4000))
    assert a == b and len(a) == 4000
    assert a[-1].arrival_s == pytest.approx(200.0, rel=0.05)
    assert list(synthetic(20.0, dist, dist, seed=4, num_requests=10)) != a[:10]
    timed = list(synthetic(20.0, dist, dist, seed=3, duration_s=10.0))
    assert timed[-1].arrival_s <= 10.0 and 150 < len(timed) < 250


def test_diurnal_rate_follows_the_curve():
    d = Diurnal(period_s=1000.0, peak=1.8, trough=0.2)
    assert d.factor(0.0) == pytest.approx(0.2) and d.factor(500.0) == pytest.approx(1.8)
    for t in (1.0, 250.0, 777.0, 2500.0):
        assert d.invert(d.integral(t)) == pytest.approx(t, abs=1e-6)
    dist = parse_length_dist("8")
    reqs = list(synthetic(10.0, dist, dist, seed=0, duration_s=1000.0, diurnal=d))
    quiet = sum(1 for r in reqs if r.arrival_s < 100 or r.arrival_s > 900)
    busy = sum(1 for r in reqs if 400 < r.arrival_s < 600)
    assert busy > 4 * quiet and len(reqs) == pytest.approx(10000, rel=0.05)


def test_synthetic_prefix_groups_share_their_system_prompt():
    dist = parse_length_dist("uniform:200:300")
    reqs = list(synthetic(5.0, dist, parse_length_dist("4"), seed=1, num_requests=50,
                          prefix=PrefixSpec(groups=2, tokens=128)))
    firsts = {prompt_block_hashes(r, i, 16)[7] for i, r in enumerate(reqs)}
    assert len(firsts) == 2  # block 7 (tokens 112..127) belongs to one of two system prompts
    assert len({prompt_block_hashes(r, i, 16)[8] for i, r in enumerate(reqs)}) == 50
    assert not math.isnan(reqs[0].arrival_s)
