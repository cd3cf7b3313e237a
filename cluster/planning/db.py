"""The profile database: measured and derived performance figures in SQLite.

One file (``--db``, ``$SPLITSERVE_PROFILE_DB``, else
``~/.splitserve/profiles.db``) with a table per kind of figure. Every
figure row says how it was obtained (``provenance``: ``measured`` on a
device, or ``derived`` from datasheets through the efficiency model), on
which host, and when (``created_at``, Unix seconds). Readers ask for the
best figure: a measured row wins over a derived one, a newer over an older.

Tables: ``hardware`` (peaks, memory, links, price), ``models`` (shapes),
``engine_settings``, ``step_times`` (one engine step's mix of work and its
duration), ``handoff`` (KV transfer throughput per transport), ``startup``
(replica start-up seconds), ``serving`` (the serving path's cost beyond
the engine step: per decode step, per sequence, per request), ``quality`` (e.g. perplexity on a held-out
text), ``speculation`` (speculative decoding's acceptance per model, draft,
method, workload and k; ``records.SpecAcceptance``). ``db_schema`` holds
the tables' SQL; docs/planning.md shows the schema.

Versions: 1 had no ``speculation`` table; a version-1 file is migrated in
place when opened (the table is added, nothing else changes), so old files
stay readable. A file of a newer version than this one is refused, and so
is an SQLite file of another application or a table without its columns
(``db_schema.schema_problem``), before anything is written into it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable

from splitserve.cluster.planning.db_schema import (BEST, READABLE_VERSIONS, SAME_SHAPE, SCHEMA,
                                                  SCHEMA_VERSION, migrate_columns, schema_problem,
                                                  shape_args)
from splitserve.cluster.planning.hardware import CATALOG_PATH, Efficiency, Hardware, host_name, load_catalog
from splitserve.cluster.planning.records import (
    DERIVED, MEASURED, PROVENANCES, EngineSettings, SpecAcceptance, StepSample)
from splitserve.cluster.planning.shapes import ModelShape


class ProfileDBError(RuntimeError):
    """The database file cannot be opened, or holds another schema version."""


def default_db_path() -> Path:
    env = os.environ.get("SPLITSERVE_PROFILE_DB")
    return Path(env) if env else Path.home() / ".splitserve" / "profiles.db"


class ProfileDB:
    def __init__(self, path: str | Path | None = None, seed_catalog: bool = True):
        self.path = Path(path) if path is not None else default_db_path()
        if str(self.path) != ":memory:":
            if self.path.is_dir():
                raise ProfileDBError(f"{self.path}: is a directory; the profile database is a "
                                     "file (e.g. profiles.db)")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise ProfileDBError(f"{self.path}: cannot create its directory: a file in "
                                     f"{self.path.parent} is not a directory") from None
            except OSError as e:
                raise ProfileDBError(f"{self.path}: cannot create its directory "
                                     f"{self.path.parent}: {e.strerror}") from None
        try:
            self.conn = sqlite3.connect(str(self.path))
            self.conn.row_factory = sqlite3.Row
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in READABLE_VERSIONS:
                raise ProfileDBError(f"{self.path}: schema version {version}, this splitserve "
                                     f"reads versions up to {SCHEMA_VERSION}; use another --db")
            problem = schema_problem(self.conn)  # before SCHEMA writes into a foreign file
            if problem:
                self.conn.close()
                raise ProfileDBError(f"{self.path}: {problem}")
            self.conn.executescript(SCHEMA)
            migrate_columns(self.conn)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.conn.commit()
        except sqlite3.Error as e:  # not a database, a read-only file or folder, a full disk
            raise ProfileDBError(f"{self.path}: cannot open the profile database: {e}") from None
        if seed_catalog and not self.conn.execute(
                "SELECT 1 FROM hardware WHERE provenance = 'derived' LIMIT 1").fetchone():
            self.load_catalog()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ProfileDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- hardware ---------------------------------------------------------------
    def load_catalog(self, path: str | Path = CATALOG_PATH) -> int:
        """(Re)write the derived catalog rows from a catalog file; returns how many."""
        gpus, _, _ = load_catalog(path)
        for hw in gpus.values():
            self.put_hardware(hw)
        return len(gpus)

    def put_hardware(self, hw: Hardware) -> int:
        if hw.provenance not in PROVENANCES:
            raise ValueError(f"provenance must be one of {PROVENANCES}, got {hw.provenance!r}")
        cur = self.conn.execute(
            "INSERT INTO hardware (key, name, provenance, peak_flops_json, memory_bandwidth, "
            "memory_bytes, intra_node_bandwidth, network_bandwidth, price_per_hour, price_source, "
            "efficiency_json, source, host, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (key, provenance, host) DO UPDATE SET name=excluded.name, "
            "peak_flops_json=excluded.peak_flops_json, memory_bandwidth=excluded.memory_bandwidth, "
            "memory_bytes=excluded.memory_bytes, intra_node_bandwidth=excluded.intra_node_bandwidth, "
            "network_bandwidth=excluded.network_bandwidth, price_per_hour=excluded.price_per_hour, "
            "price_source=excluded.price_source, efficiency_json=excluded.efficiency_json, "
            "source=excluded.source, created_at=excluded.created_at",
            (hw.key, hw.name, hw.provenance, json.dumps(hw.peak_flops), hw.memory_bandwidth,
             hw.memory_bytes, hw.intra_node_bandwidth, hw.network_bandwidth, hw.price_per_hour,
             hw.price_source, json.dumps(asdict(hw.efficiency)), hw.source, hw.host, time.time()))
        self.conn.commit()
        return cur.lastrowid

    def hardware(self, key: str) -> Hardware | None:
        """The best row for ``key``. A measured row's missing figures (a CPU
        has no price) are not filled from elsewhere; its price is taken from
        the derived row of the same key when it has none."""
        rows = self.conn.execute(f"SELECT * FROM hardware WHERE key = ? {BEST}", (key,)).fetchall()
        if not rows:
            return None
        best = _hardware(rows[0])
        if best.price_per_hour is None:
            priced = next((r for r in rows if r["price_per_hour"] is not None), None)
            if priced is not None:
                best = replace(best, price_per_hour=priced["price_per_hour"],
                               price_source=priced["price_source"])
        return best

    def hardware_keys(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT key FROM hardware ORDER BY key")]

    # -- models and settings -------------------------------------------------------
    def put_model(self, shape: ModelShape) -> int:
        """The id of ``shape``'s row, written if new; a row of the same key
        written before its parameters were counted gets ``shape``'s counts,
        one written before its states' split was known its ``state_heads``,
        one written before its routed experts were counted ``params_routed``."""
        counted = (shape.params_total, shape.params_active, shape.max_position)
        row = self.conn.execute("SELECT id, params_total, state_heads, params_routed FROM models "
                                "WHERE key = ?", (shape.key,)).fetchone()
        if row:
            if not row["params_routed"] and shape.params_routed:
                self.conn.execute("UPDATE models SET params_routed = ? WHERE id = ?",
                                  (shape.params_routed, row["id"]))
                self.conn.commit()
            if not row["state_heads"] and shape.state_heads:
                self.conn.execute("UPDATE models SET state_heads = ? WHERE id = ?",
                                  (shape.state_heads, row["id"]))
                self.conn.commit()
            if not row["params_total"] and shape.params_total:
                self.conn.execute("UPDATE models SET num_params = ?, params_total = ?, "
                                  "params_active = ?, max_position = ? WHERE id = ?",
                                  (shape.num_params, *counted, row["id"]))
                self.conn.commit()
            return row["id"]
        cur = self.conn.execute(
            "INSERT INTO models (key, name, num_layers, hidden_size, intermediate_size, num_heads, "
            "num_kv_heads, head_dim, vocab_size, num_experts, experts_per_token, "
            "tie_word_embeddings, num_params, created_at, num_cache_layers, params_total, "
            "params_active, max_position, state_elems, state_elems_fp32, kv_planes, state_heads, "
            "params_routed, fp8_weights) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (shape.key, shape.name, shape.num_layers, shape.hidden_size, shape.intermediate_size,
             shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.vocab_size,
             shape.num_experts, shape.experts_per_token, int(shape.tie_word_embeddings),
             shape.num_params, time.time(), shape.num_cache_layers, *counted,
             shape.state_elems, shape.state_elems_fp32, shape.kv_planes, shape.state_heads,
             shape.params_routed, int(shape.fp8_weights)))
        self.conn.commit()
        return cur.lastrowid

    def model(self, key_or_name: str) -> ModelShape | None:
        row = self.conn.execute(
            "SELECT * FROM models WHERE key = ? OR name = ? ORDER BY created_at DESC LIMIT 1",
            (key_or_name, key_or_name)).fetchone()
        if row is None:
            return None
        return ModelShape(row["name"], row["num_layers"], row["hidden_size"],
                          row["intermediate_size"], row["num_heads"], row["num_kv_heads"],
                          row["head_dim"], row["vocab_size"], row["num_experts"],
                          row["experts_per_token"], bool(row["tie_word_embeddings"]),
                          row["num_cache_layers"], row["params_total"], row["params_active"],
                          row["state_elems"], row["state_elems_fp32"], row["max_position"],
                          row["kv_planes"], row["state_heads"], row["params_routed"],
                          bool(row["fp8_weights"]))

    def put_settings(self, s: EngineSettings) -> int:
        row = self.conn.execute("SELECT id FROM engine_settings WHERE key = ?", (s.key,)).fetchone()
        if row:
            return row[0]
        cur = self.conn.execute(
            "INSERT INTO engine_settings (key, dtype, kv_dtype, block_size, max_num_seqs, "
            "max_num_batched_tokens, kernel_backend, device, tensor_parallel, speed_key) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (s.key, s.dtype, s.kv_dtype, s.block_size, s.max_num_seqs, s.max_num_batched_tokens,
             s.kernel_backend, s.device, s.tensor_parallel, s.speed_key))
        self.conn.commit()
        return cur.lastrowid

    # -- step times ---------------------------------------------------------------
    def add_step_samples(self, shape: ModelShape, hardware_key: str, settings: EngineSettings,
                         samples: Iterable[StepSample], provenance: str = MEASURED,
                         host: str | None = None) -> int:
        mid, sid = self.put_model(shape), self.put_settings(settings)
        host = host_name() if host is None else host
        now = time.time()
        rows = [(mid, hardware_key, sid, provenance, s.prefill_tokens, s.prefill_attn,
                 s.prefill_seqs, s.decode_seqs, s.decode_context, s.step_s, s.repeats, s.std_s,
                 host, now) for s in samples]
        self.conn.executemany(
            "INSERT INTO step_times (model_id, hardware_key, settings_id, provenance, "
            "prefill_tokens, prefill_attn, prefill_seqs, decode_seqs, decode_context, step_s, "
            "repeats, std_s, host, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        self.conn.commit()
        return len(rows)

    def step_samples(self, model_key: str, hardware_key: str, speed_key: str | None = None,
                     provenance: str = MEASURED) -> list[StepSample]:
        """Rows for a model (key or name) on a device, with settings of the
        same speed (``EngineSettings.speed_key``) when given."""
        sql = ("SELECT s.* FROM step_times s JOIN models m ON m.id = s.model_id "
               "JOIN engine_settings e ON e.id = s.settings_id "
               f"WHERE {SAME_SHAPE} AND s.hardware_key = ? AND s.provenance = ?")
        args: list = [*shape_args(model_key), hardware_key, provenance]
        if speed_key is not None:
            sql += " AND e.speed_key = ?"
            args.append(speed_key)
        return [StepSample(r["prefill_tokens"], r["prefill_attn"], r["prefill_seqs"],
                           r["decode_seqs"], r["decode_context"], r["step_s"], r["repeats"],
                           r["std_s"]) for r in self.conn.execute(sql + " ORDER BY s.id", args)]

    def profiled(self) -> list[dict]:
        """(model, hardware, settings, provenance, rows) of every step-time profile."""
        rows = self.conn.execute(
            "SELECT m.name AS model, m.key AS model_key, s.hardware_key, e.key AS settings, "
            "s.provenance, COUNT(*) AS rows, MAX(s.created_at) AS at FROM step_times s "
            "JOIN models m ON m.id = s.model_id JOIN engine_settings e ON e.id = s.settings_id "
            "GROUP BY m.key, s.hardware_key, e.key, s.provenance ORDER BY at").fetchall()
        return [dict(r) for r in rows]

    # -- hand-off, start-up, quality --------------------------------------------------
    def add_handoff(self, transport: str, hardware_key: str, nbytes: int, seconds: float,
                    same_node: bool, provenance: str = MEASURED) -> None:
        self.conn.execute(
            "INSERT INTO handoff (transport, hardware_key, same_node, bytes, seconds, bytes_per_s, "
            "provenance, host, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (transport, hardware_key, int(same_node), nbytes, seconds, nbytes / seconds,
             provenance, host_name(), time.time()))
        self.conn.commit()

    def handoff_bytes_per_s(self, transport: str, hardware_key: str | None = None) -> float | None:
        """Median measured throughput of ``transport`` (on ``hardware_key`` if given)."""
        sql, args = "SELECT bytes_per_s FROM handoff WHERE transport = ? AND provenance = ?", [
            transport, MEASURED]
        if hardware_key is not None:
            sql += " AND hardware_key = ?"
            args.append(hardware_key)
        vals = sorted(r[0] for r in self.conn.execute(sql, args))
        return vals[len(vals) // 2] if vals else None

    def add_startup(self, shape: ModelShape, hardware_key: str, seconds: float,
                    provenance: str = MEASURED) -> None:
        self.conn.execute(
            "INSERT INTO startup (model_id, hardware_key, seconds, provenance, host, created_at) "
            "VALUES (?,?,?,?,?,?)",
            (self.put_model(shape), hardware_key, seconds, provenance, host_name(), time.time()))
        self.conn.commit()

    def startup_s(self, model_key: str, hardware_key: str) -> tuple[float, str] | None:
        row = self.conn.execute(
            "SELECT s.seconds, s.provenance FROM startup s JOIN models m ON m.id = s.model_id "
            f"WHERE {SAME_SHAPE} AND s.hardware_key = ? "
            "ORDER BY (s.provenance = 'measured') DESC, s.created_at DESC, s.id DESC",
            (*shape_args(model_key), hardware_key)).fetchone()
        return (row[0], row[1]) if row else None

    def add_serving(self, shape: ModelShape, hardware_key: str, layout: str, per_step_s: float,
                    per_seq_s: float, per_request_s: float, requests: int,
                    provenance: str = MEASURED) -> None:
        self.conn.execute(
            "INSERT INTO serving (model_id, hardware_key, layout, per_step_s, per_seq_s, "
            "per_request_s, requests, provenance, host, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (self.put_model(shape), hardware_key, layout, per_step_s, per_seq_s, per_request_s,
             requests, provenance, host_name(), time.time()))
        self.conn.commit()

    def serving(self, model_key: str, hardware_key: str, layout: str) -> dict | None:
        """The best serving-overhead row {per_step_s, per_seq_s, per_request_s,
        requests, provenance, created_at}, or None."""
        row = self.conn.execute(
            "SELECT s.per_step_s, s.per_seq_s, s.per_request_s, s.requests, s.provenance, "
            "s.created_at FROM serving s JOIN models m ON m.id = s.model_id "
            f"WHERE {SAME_SHAPE} AND s.hardware_key = ? AND s.layout = ? "
            "ORDER BY (s.provenance = 'measured') DESC, s.created_at DESC, s.id DESC",
            (*shape_args(model_key), hardware_key, layout)).fetchone()
        return dict(row) if row else None

    def add_quality(self, shape: ModelShape, settings: EngineSettings, metric: str, value: float,
                    dataset: str, num_tokens: int, provenance: str = MEASURED) -> None:
        self.conn.execute(
            "INSERT INTO quality (model_id, settings_id, metric, value, dataset, num_tokens, "
            "provenance, host, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (self.put_model(shape), self.put_settings(settings), metric, value, dataset,
             num_tokens, provenance, host_name(), time.time()))
        self.conn.commit()

    def quality(self, model_key: str) -> list[dict]:
        rows = self.conn.execute(
            "SELECT q.metric, q.value, q.dataset, q.num_tokens, q.provenance, e.key AS settings, "
            "q.created_at FROM quality q JOIN models m ON m.id = q.model_id "
            "JOIN engine_settings e ON e.id = q.settings_id WHERE m.key = ? OR m.name = ? "
            "ORDER BY q.created_at", (model_key, model_key)).fetchall()
        return [dict(r) for r in rows]

    # -- speculation --------------------------------------------------------------------
    def add_speculation(self, shape: ModelShape, row: SpecAcceptance,
                        host: str | None = None) -> None:
        self.conn.execute(
            "INSERT INTO speculation (model_id, method, draft, workload, k, acceptance, "
            "acceptance_rate, mean_accepted_length, draft_tokens, tokens_per_step, steps, "
            "dataset, source, provenance, host, created_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (self.put_model(shape), row.method, row.draft, row.workload, row.k, row.acceptance,
             row.acceptance_rate, row.mean_accepted_length, row.draft_tokens,
             row.tokens_per_step, row.steps, row.dataset, row.source, row.provenance,
             host_name() if host is None else host, time.time()))
        self.conn.commit()

    def speculation(self, model_key: str, method: str | None = None,
                    workload: str | None = None) -> list[SpecAcceptance]:
        """Acceptance rows of a model (key, name, or a model of the same
        structure), of ``method`` and ``workload`` when given; best first
        (measured over derived, then newest)."""
        sql = ("SELECT s.* FROM speculation s JOIN models m ON m.id = s.model_id "
               f"WHERE {SAME_SHAPE}")
        args: list = [*shape_args(model_key)]
        if method is not None:
            sql += " AND s.method = ?"
            args.append(method)
        if workload is not None:
            sql += " AND s.workload = ?"
            args.append(workload)
        sql += " ORDER BY (s.provenance = 'measured') DESC, s.created_at DESC, s.id DESC"
        return [SpecAcceptance(
            method=r["method"], draft=r["draft"], workload=r["workload"], k=r["k"],
            acceptance=r["acceptance"], acceptance_rate=r["acceptance_rate"],
            mean_accepted_length=r["mean_accepted_length"], draft_tokens=r["draft_tokens"],
            tokens_per_step=r["tokens_per_step"], steps=r["steps"], dataset=r["dataset"],
            source=r["source"], provenance=r["provenance"])
            for r in self.conn.execute(sql, args)]

    def speculation_summary(self) -> list[dict]:
        """The newest acceptance row of each (model, method, draft, workload, k)."""
        rows = self.conn.execute(
            "SELECT m.name AS model, s.method, s.draft, s.workload, s.k, s.acceptance, "
            "s.acceptance_rate, s.provenance, MAX(s.created_at) AS at FROM speculation s "
            "JOIN models m ON m.id = s.model_id "
            "GROUP BY m.key, s.method, s.draft, s.workload, s.k ORDER BY at").fetchall()
        return [dict(r) for r in rows]


def _hardware(row: sqlite3.Row) -> Hardware:
    return Hardware(
        key=row["key"], name=row["name"], peak_flops=json.loads(row["peak_flops_json"]),
        memory_bandwidth=row["memory_bandwidth"], memory_bytes=row["memory_bytes"],
        intra_node_bandwidth=row["intra_node_bandwidth"],
        network_bandwidth=row["network_bandwidth"], price_per_hour=row["price_per_hour"],
        price_source=row["price_source"], source=row["source"], provenance=row["provenance"],
        host=row["host"], efficiency=Efficiency(**json.loads(row["efficiency_json"])))


__all__ = ["ProfileDB", "ProfileDBError", "default_db_path", "MEASURED", "DERIVED"]
