"""The profile database: schema, catalog rows, measured-over-derived, prices."""

import sqlite3
from dataclasses import replace

import pytest

from splitserve.cluster.planning import profiles
from splitserve.cluster.planning.db import ProfileDB, ProfileDBError
from splitserve.cluster.planning.hardware import CatalogError, load_catalog
from splitserve.cluster.planning.records import DERIVED, MEASURED, EngineSettings, StepSample
from splitserve.cluster.planning.shapes import PRESETS

GPUS = {"h100-sxm", "h200", "a100-80gb", "l40s", "mi300x"}
LLAMA8B = PRESETS["llama-3.1-8b"]


@pytest.fixture
def db(tmp_path):
    with ProfileDB(tmp_path / "p.db") as d:
        yield d


def test_catalog_rows_are_derived_with_prices_and_their_source(db):
    assert GPUS <= set(db.hardware_keys())
    for key in GPUS:
        hw = db.hardware(key)
        assert hw.provenance == DERIVED
        assert hw.price_per_hour > 0 and "RunPod" in hw.price_source
        assert hw.flops("bfloat16") > 1e14 and hw.memory_bandwidth > 5e11
    assert db.hardware("a100-80gb").flops("fp8") == db.hardware("a100-80gb").flops("bfloat16")


def test_a_measured_row_wins_and_keeps_the_catalog_price(db):
    derived = db.hardware("h100-sxm")
    db.put_hardware(replace(derived, provenance=MEASURED, host="gpu-node-1",
                            memory_bandwidth=2.9e12, price_per_hour=None, price_source=""))
    best = db.hardware("h100-sxm")
    assert (best.provenance, best.memory_bandwidth) == (MEASURED, 2.9e12)
    assert best.price_per_hour == derived.price_per_hour


def test_schema_records_provenance_host_and_time(db, tmp_path):
    s = EngineSettings(device="cpu", dtype="float32", kv_dtype="float32")
    db.add_step_samples(LLAMA8B, "cpu:x:1", s, [StepSample(16, 136.0, 1, 0, 0, 0.01)])
    db.add_startup(LLAMA8B, "cpu:x:1", 4.5)
    db.add_quality(LLAMA8B, s, "perplexity", 12.5, "heldout.txt", 300)
    db.add_handoff("grpc", "cpu:x:1", 1 << 20, 0.01, same_node=True)
    con = sqlite3.connect(tmp_path / "p.db")
    for table in ("step_times", "startup", "quality", "handoff"):
        prov, host, at = con.execute(f"SELECT provenance, host, created_at FROM {table}").fetchone()
        assert prov == MEASURED and host and at > 1.6e9
    assert db.step_samples(LLAMA8B.key, "cpu:x:1", s.speed_key)[0].prefill_tokens == 16
    assert db.step_samples(LLAMA8B.name, "cpu:x:1")[0].step_s == 0.01  # by name too
    assert db.startup_s(LLAMA8B.key, "cpu:x:1") == (4.5, MEASURED)
    assert db.quality(LLAMA8B.key)[0]["value"] == 12.5
    assert db.handoff_bytes_per_s("grpc") == pytest.approx((1 << 20) / 0.01)
    assert db.model(LLAMA8B.key) == LLAMA8B


def test_measured_steps_replace_the_roofline(db):
    s = EngineSettings()
    hw = profiles.hardware(db, "h100-sxm")
    assert profiles.step_model(db, LLAMA8B, hw, s).provenance == DERIVED
    rows = [StepSample(p, p * p / 2, 1 if p else 0, b, b * 500, 0.01 + 1e-5 * p + 1e-4 * b)
            for p in (0, 128, 512) for b in (1, 8, 32)]
    db.add_step_samples(LLAMA8B, "h100-sxm", s, rows)
    m = profiles.step_model(db, LLAMA8B, hw, s)
    assert m.provenance == MEASURED and m.fit.mean_abs_rel_error < 0.01
    # other speed settings (fp8 KV) still use the roofline
    assert profiles.step_model(db, LLAMA8B, hw, replace(s, kv_dtype="fp8")).provenance == DERIVED


def test_derived_startup_reads_the_weights_at_the_load_bandwidth(db):
    hw = profiles.hardware(db, "h100-sxm")
    secs, prov = profiles.startup(db, LLAMA8B, hw, EngineSettings())
    eff = hw.efficiency
    assert prov == DERIVED
    assert secs == pytest.approx(eff.startup_fixed_s + LLAMA8B.num_params * 2 / eff.load_bytes_per_s)


def test_unknown_hardware_names_the_known_keys(db):
    with pytest.raises(LookupError, match="h100-sxm"):
        profiles.hardware(db, "b200")


def test_another_schema_version_is_refused(tmp_path):
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("PRAGMA user_version = 7")
    con.commit()
    with pytest.raises(ProfileDBError, match="schema version 7"):
        ProfileDB(tmp_path / "old.db")


def test_a_bad_catalog_names_the_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("gpus:\n  x:\n    peak_flops: {bfloat16: 1e15}\n    memory_bandwidth: -1\n")
    with pytest.raises(CatalogError, match="gpus.x: 'memory_bandwidth' must be > 0"):
        load_catalog(bad)


def test_a_catalog_gpu_entry_refuses_an_unknown_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("gpus:\n  x:\n    peak_flops: {bfloat16: 1e15}\n    memory_bandwidth: 1e12\n"
                   "    memory_bytes: 8e10\n    intra_node_bandwidth: 1e11\n"
                   "    network_bandwidth: 1e10\n    nmae: X\n")
    with pytest.raises(CatalogError) as e:
        load_catalog(bad)
    assert str(e.value) == (f"{bad}: gpus.x: unknown key 'nmae' (did you mean 'name'?); the keys "
                            "are name, peak_flops, memory_bandwidth, memory_bytes, "
                            "intra_node_bandwidth, network_bandwidth, source")
    bad.write_text(bad.read_text().replace("    nmae: X\n", "    name: X\n"))
    assert load_catalog(bad)[0]["x"].name == "X"


def test_shapes_count_parameters_and_kv_bytes():
    assert LLAMA8B.kv_bytes_per_token("bfloat16") == 128 * 1024  # 128 KiB, docs/benchmarks.md
    assert 7.9e9 < LLAMA8B.num_params < 8.1e9
    assert 69e9 < PRESETS["llama-3.1-70b"].num_params < 72e9
    mix = PRESETS["mixtral-8x7b"]
    assert 45e9 < mix.num_params < 48e9 and 12e9 < mix.active_params_per_token < 14e9


def test_a_shape_profiled_under_another_name_is_found_by_its_structure(db):
    # `splitserve profile --config` names the embedded model by its served name,
    # a simulation by its folder: the same weights, so the same rows
    s = EngineSettings()
    served = replace(LLAMA8B, name="default")
    rows = [StepSample(p, p * p / 2, 1 if p else 0, b, b * 500, 0.01 + 1e-5 * p + 1e-4 * b)
            for p in (0, 128, 512) for b in (1, 8, 32)]
    db.add_step_samples(served, "h100-sxm", s, rows)
    db.add_startup(served, "h100-sxm", 4.5)
    other = replace(LLAMA8B, name="default-model-v1")
    assert len(db.step_samples(other.key, "h100-sxm")) == 9
    assert db.startup_s(other.key, "h100-sxm") == (4.5, MEASURED)
    assert profiles.step_model(db, other, profiles.hardware(db, "h100-sxm"), s).provenance \
        == MEASURED
    # another structure is not
    bigger = replace(LLAMA8B, name="default", num_layers=LLAMA8B.num_layers + 1)
    assert db.step_samples(bigger.key, "h100-sxm") == []
