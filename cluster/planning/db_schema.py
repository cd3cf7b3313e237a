"""The profile database's SQL: its tables, their version, and the query
fragments every reader shares.

``ProfileDB`` (``cluster.planning.db``) runs ``SCHEMA`` on every open; all
of it is ``CREATE ... IF NOT EXISTS``, which is also how an older file is
migrated (version 1 lacked the ``speculation`` table); columns added since
(``ADDED_COLUMNS``: version 3's ``models.num_cache_layers``, version 4's
parameter counts, recurrent state sizes, context length and K/V planes,
version 5's ``models.state_heads``, version 6's ``models.params_routed`` and ``fp8_weights``) are added to an
older file's tables by ``migrate_columns``. ``SAME_SHAPE`` with
``shape_args`` matches a model by key, name or structure; ``BEST`` orders
rows best first. docs/planning.md shows the schema as tables.
"""

from __future__ import annotations

SCHEMA_VERSION = 6
# versions this one opens (older ones are migrated: only tables and ADDED_COLUMNS since)
READABLE_VERSIONS = (0, 1, 2, 3, 4, 5, 6)
# table -> column -> its definition, for columns added after their table: an older file
# lacks them, and opening it adds them (migrate_columns)
_ZERO = "INTEGER NOT NULL DEFAULT 0"
ADDED_COLUMNS = {"models": {"num_cache_layers": _ZERO,  # version 3
                            # version 4 (0: unknown, as in every older row)
                            "params_total": _ZERO, "params_active": _ZERO, "state_elems": _ZERO,
                            "state_elems_fp32": _ZERO, "max_position": _ZERO, "kv_planes": _ZERO,
                            "state_heads": _ZERO,  # version 5 (0: recurrent layers not split)
                            "params_routed": _ZERO,  # version 6 (0: not counted)
                            "fp8_weights": _ZERO}}  # version 6 (0: projections not in fp8)

SCHEMA = """
CREATE TABLE IF NOT EXISTS hardware (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,                  -- h100-sxm, or cpu:<model>:<threads>
    name TEXT NOT NULL,
    provenance TEXT NOT NULL CHECK (provenance IN ('measured', 'derived')),
    peak_flops_json TEXT NOT NULL,      -- {"bfloat16": FLOP/s, ...}, dense
    memory_bandwidth REAL NOT NULL,     -- bytes/s
    memory_bytes REAL NOT NULL,
    intra_node_bandwidth REAL NOT NULL, -- bytes/s, device to device in a node
    network_bandwidth REAL NOT NULL,    -- bytes/s per device to other nodes
    price_per_hour REAL,                -- per device
    price_source TEXT NOT NULL DEFAULT '',
    efficiency_json TEXT NOT NULL,      -- the efficiency model a derived row used
    source TEXT NOT NULL DEFAULT '',
    host TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    UNIQUE (key, provenance, host)
);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,           -- name@digest of the shape
    name TEXT NOT NULL,
    num_layers INTEGER NOT NULL, hidden_size INTEGER NOT NULL,
    intermediate_size INTEGER NOT NULL, num_heads INTEGER NOT NULL,
    num_kv_heads INTEGER NOT NULL, head_dim INTEGER NOT NULL, vocab_size INTEGER NOT NULL,
    num_experts INTEGER NOT NULL DEFAULT 0, experts_per_token INTEGER NOT NULL DEFAULT 0,
    tie_word_embeddings INTEGER NOT NULL DEFAULT 0,
    num_params INTEGER NOT NULL,
    created_at REAL NOT NULL,
    num_cache_layers INTEGER NOT NULL DEFAULT 0, -- 0: every layer keeps KV (version 3)
    params_total INTEGER NOT NULL DEFAULT 0,     -- the engine's model, counted (version 4; 0: unknown)
    params_active INTEGER NOT NULL DEFAULT 0,    -- per token: chosen experts, no lookup tables
    state_elems INTEGER NOT NULL DEFAULT 0,      -- recurrent state per sequence, model dtype
    state_elems_fp32 INTEGER NOT NULL DEFAULT 0, -- recurrent state per sequence, float32
    max_position INTEGER NOT NULL DEFAULT 0,     -- context length (0: unknown)
    kv_planes INTEGER NOT NULL DEFAULT 0,        -- K/V planes per cached layer: 1 for MLA (0: 2)
    state_heads INTEGER NOT NULL DEFAULT 0,      -- heads recurrent states split by across TP ranks (version 5)
    params_routed INTEGER NOT NULL DEFAULT 0,    -- the routed experts' weights (version 6; 0: not counted)
    fp8_weights INTEGER NOT NULL DEFAULT 0       -- 1: an fp8 checkpoint (version 6)
);
CREATE TABLE IF NOT EXISTS engine_settings (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    dtype TEXT NOT NULL, kv_dtype TEXT NOT NULL, block_size INTEGER NOT NULL,
    max_num_seqs INTEGER NOT NULL, max_num_batched_tokens INTEGER NOT NULL,
    kernel_backend TEXT NOT NULL, device TEXT NOT NULL, tensor_parallel INTEGER NOT NULL,
    speed_key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS step_times (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id),
    hardware_key TEXT NOT NULL,
    settings_id INTEGER NOT NULL REFERENCES engine_settings(id),
    provenance TEXT NOT NULL CHECK (provenance IN ('measured', 'derived')),
    prefill_tokens INTEGER NOT NULL,    -- new prompt tokens in the step
    prefill_attn REAL NOT NULL,         -- causal query-key pairs of those chunks
    prefill_seqs INTEGER NOT NULL,
    decode_seqs INTEGER NOT NULL,       -- sequences decoding one token
    decode_context INTEGER NOT NULL,    -- sum of their attention lengths
    step_s REAL NOT NULL,               -- median over repeats
    repeats INTEGER NOT NULL, std_s REAL NOT NULL,
    host TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS step_times_by_key ON step_times (model_id, hardware_key, settings_id);
CREATE TABLE IF NOT EXISTS handoff (
    id INTEGER PRIMARY KEY,
    transport TEXT NOT NULL,            -- grpc | torch_dist | ...
    hardware_key TEXT NOT NULL,
    same_node INTEGER NOT NULL,         -- 1: both ends on one node (loopback)
    bytes INTEGER NOT NULL, seconds REAL NOT NULL,
    bytes_per_s REAL NOT NULL,
    provenance TEXT NOT NULL CHECK (provenance IN ('measured', 'derived')),
    host TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS startup (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id),
    hardware_key TEXT NOT NULL,
    seconds REAL NOT NULL,              -- replica start until it serves
    provenance TEXT NOT NULL CHECK (provenance IN ('measured', 'derived')),
    host TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS serving (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id),
    hardware_key TEXT NOT NULL,
    layout TEXT NOT NULL,               -- disaggregated | colocated
    per_step_s REAL NOT NULL,           -- serving path per decode step, beyond engine.step()
    per_seq_s REAL NOT NULL,            -- and per sequence of that step
    per_request_s REAL NOT NULL,        -- serving path per request, beyond the modelled TTFT
    requests INTEGER NOT NULL,          -- probe requests it was measured from
    provenance TEXT NOT NULL CHECK (provenance IN ('measured', 'derived')),
    host TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quality (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id),
    settings_id INTEGER NOT NULL REFERENCES engine_settings(id),
    metric TEXT NOT NULL,               -- perplexity
    value REAL NOT NULL,
    dataset TEXT NOT NULL,              -- which held-out text
    num_tokens INTEGER NOT NULL,
    provenance TEXT NOT NULL CHECK (provenance IN ('measured', 'derived')),
    host TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS speculation (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id),   -- the target model
    method TEXT NOT NULL CHECK (method IN ('ngram', 'draft')),
    draft TEXT NOT NULL,                -- draft model key (name@digest), or ngram:MIN-MAX
    workload TEXT NOT NULL,             -- code-edit | free | a named dataset
    k INTEGER NOT NULL,                 -- draft tokens per verify step
    acceptance REAL NOT NULL,           -- per-token rate of the planner's model (fitted)
    acceptance_rate REAL NOT NULL,      -- accepted / drafted tokens (the engine's counter)
    mean_accepted_length REAL NOT NULL, -- 1 + accepted drafts per verified sequence
    draft_tokens INTEGER NOT NULL,      -- drafted tokens it was measured over
    tokens_per_step REAL NOT NULL,      -- output tokens per decoding sequence-step (0: unknown)
    steps INTEGER NOT NULL,             -- sequence-steps behind it (0: unknown)
    dataset TEXT NOT NULL DEFAULT '',   -- the text the prompts came from
    source TEXT NOT NULL DEFAULT '',    -- the profile run, or an imported record
    provenance TEXT NOT NULL CHECK (provenance IN ('measured', 'derived')),
    host TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS speculation_by_model ON speculation (model_id, method);
"""

# A model is asked for by key (name@digest), by name, or matches any row of
# the same structure (digest): one checkpoint profiled under a config's
# served name ("default") serves a simulation that names it by its folder.
SAME_SHAPE = "(m.key = ? OR m.name = ? OR (? != '' AND m.key LIKE '%@' || ?))"


def shape_args(model_key: str) -> tuple[str, str, str, str]:
    """The arguments of ``SAME_SHAPE`` for ``model_key``."""
    digest = model_key.rpartition("@")[2] if "@" in model_key else ""
    return model_key, model_key, digest, digest


# best first: measured over derived, then newest
BEST = "ORDER BY (provenance = 'measured') DESC, created_at DESC, id DESC"


def schema_problem(conn) -> str | None:
    """Why the database behind ``conn`` (an sqlite3 connection, before
    ``SCHEMA`` runs on it) is not a profile database, or None: a fresh or
    version-0 file that holds only other tables belongs to something else,
    and a table of ours without every column ``SCHEMA`` gives it was not
    written by splitserve or was damaged (reading it would fail mid-command)."""
    import sqlite3

    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                       "AND name NOT LIKE 'sqlite_%'")}
    want = expected_columns()
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and have and not have & want.keys():
        return (f"an SQLite database of something else (tables: {', '.join(sorted(have))}), "
                "not a profile database; give --db a new file or a profile database")
    for table in sorted(have & want.keys()):
        try:
            cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        except sqlite3.Error:
            cols = set()
        missing = [c for c in want[table] if c not in cols and c not in ADDED_COLUMNS.get(table, {})]
        if missing:
            return (f"table {table} lacks the columns {', '.join(missing)}; not a profile "
                    "database, or a damaged one: give --db another file")
    return None


def migrate_columns(conn) -> None:
    """Add ``ADDED_COLUMNS`` an older file's tables lack (after ``SCHEMA`` ran)."""
    for table, added in ADDED_COLUMNS.items():
        cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for name, ddl in added.items():
            if name not in cols:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")


_COLUMNS: dict[str, list[str]] = {}


def expected_columns() -> dict[str, list[str]]:
    """Each table of ``SCHEMA`` and its columns in order (from an in-memory
    copy of it, so the list never drifts from the SQL)."""
    import sqlite3

    if not _COLUMNS:
        conn = sqlite3.connect(":memory:")
        conn.executescript(SCHEMA)
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            _COLUMNS[table] = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        conn.close()
    return _COLUMNS
