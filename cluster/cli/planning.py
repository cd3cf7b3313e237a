"""``splitserve profile`` (measure this machine into the profile database)
and ``splitserve simulate`` (run a cluster in simulation from the database).
docs/planning.md explains both."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
from pathlib import Path

from splitserve.cluster.cli.common import device_arg, device_problem, positive


def add_subcommands(sub) -> None:
    _add_profile(sub)
    _add_simulate(sub)


def _db_arg(p) -> None:
    p.add_argument("--db", default=None, metavar="PATH",
                   help="profile database file (default: $SPLITSERVE_PROFILE_DB, else "
                        "~/.splitserve/profiles.db)")


# -- profile -------------------------------------------------------------------------
def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure the engine on this machine into the profile database",
        description="Measure the local engine (the same LLMEngine every replica runs) on its "
                    "device: step times over a grid of work mixes (prompt chunk size, cached "
                    "prefix, decoding sequences, context length), engine start-up time, the "
                    "device's matmul and copy peaks, perplexity on a held-out text through the "
                    "engine's prompt-scoring path, and optionally KV hand-off throughput. Rows "
                    "are written as 'measured' and win over the catalog's 'derived' rows. "
                    "Without --model or --config: the embedded default model.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", default=None, metavar="DIR", help="checkpoint folder to profile")
    what.add_argument("--config", default=None, metavar="FILE",
                      help="operator YAML: profile each of its models with its engine settings")
    _db_arg(p)
    p.add_argument("--device", default="cpu", type=device_arg,
                   help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="with --model: the compute dtype (default: the checkpoint's)")
    p.add_argument("--threads", type=positive(int), default=None,
                   help="CPU threads of the engine (default: the pool's num_cpus with --config, "
                        "else torch's default); part of the device's key")
    p.add_argument("--fast", action="store_true",
                   help="a small grid with 3 repeats (seconds; for tests and smoke checks)")
    p.add_argument("--no-quality", action="store_true", help="skip the perplexity row")
    p.add_argument("--handoff", action="store_true",
                   help="also measure the grpc KV transport on loopback")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--speculation", action="store_true", default=None,
                      help="also measure speculative decoding's acceptance through the engine "
                           "(n-gram lookup, and a draft model: --spec-draft, or the shipped "
                           "draft for the default model) on a code-editing and a free-generation "
                           "workload from the held-out text; on by default for a --config model "
                           "with a speculative section (its own method and k)")
    spec.add_argument("--no-speculation", dest="speculation", action="store_false",
                      help="do not measure acceptance, even for a config that speculates")
    p.add_argument("--spec-draft", default=None, metavar="DIR",
                   help="with --speculation: the draft checkpoint to measure")
    p.add_argument("--spec-k", type=int, default=None, metavar="K",
                   help="draft tokens per step while measuring (default: the config's "
                        "num_speculative_tokens, else 4)")
    p.add_argument("--spec-text", default=None, metavar="FILE",
                   help="the text the acceptance prompts come from (default: the held-out "
                        "text of the perplexity row)")
    p.add_argument("--spec-import", default=None, metavar="BENCH_SPEC.json",
                   help="instead of measuring: import a benchmarks/bench_spec.py record's "
                        "fixed-k n-gram and shipped-draft acceptance (the default model's) "
                        "into the database")
    p.add_argument("--serving-url", default=None, metavar="URL",
                   help="instead of the engine: measure the serving path's cost beyond the "
                        "engine step on the cluster serving --config at this OpenAI HTTP URL "
                        "(closed loops at concurrency 1 and 4 against the simulator's "
                        "prediction from the step profile, which must exist); the simulator "
                        "adds it to that layout's decode steps and requests")
    p.add_argument("--api-key", default=None,
                   help="with --serving-url: the client API key (default: none)")
    p.add_argument("--catalog", default=None, metavar="FILE",
                   help="reload the derived hardware rows (datasheets, prices) from this "
                        "catalog file, e.g. an edited copy of cluster/planning/catalog.yaml")
    p.add_argument("--list", action="store_true", help="show what the database holds and exit")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    from splitserve.cluster.config import ConfigError
    from splitserve.cluster.planning import profile_run
    from splitserve.cluster.planning.db import ProfileDB, ProfileDBError, default_db_path
    from splitserve.cluster.planning.hardware import CatalogError
    from splitserve.cluster.planning.shapes import ShapeError
    from splitserve.engine.errors import CheckpointError

    problem = None if args.list or args.serving_url else device_problem(args.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        threads, targets = args.threads, []
        if args.spec_k is not None and not 1 <= args.spec_k <= 32:
            print("error: --spec-k must be in [1, 32]", file=sys.stderr)
            return 2
        problem = _spec_inputs_problem(args)  # read after the whole grid: checked first
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        if not (args.list or args.serving_url or args.spec_import):  # inputs checked before any file
            if threads is None and args.config:
                from splitserve.cluster.config import load_config

                threads = max(1, int(load_config(args.config).models[0].decode.num_cpus))
            targets = profile_run.targets(args.model, args.config, args.device, args.dtype)
        path = Path(args.db) if args.db else default_db_path()
        fresh = not path.exists()
        db = ProfileDB(path)
        if args.catalog:
            n = db.load_catalog(args.catalog)
            print(f"loaded {n} derived hardware rows from {args.catalog}")
        if args.list:
            return _list(db, args.json)
        if args.serving_url:
            return _serving(args, db)
        if args.spec_import:
            return _spec_import(args, db)
        try:
            with staged_copy(db) as staged:  # every row of this run, or none
                summaries = [profile_run.run(staged, t, fast=args.fast,
                                             quality=not args.no_quality, handoff=args.handoff,
                                             threads=threads,
                                             log=lambda s: print(s, file=sys.stderr, flush=True),
                                             speculation=args.speculation,
                                             spec_draft=args.spec_draft, spec_k=args.spec_k,
                                             spec_text=args.spec_text)
                             for t in targets]
        except BaseException:  # a database this run created goes with it
            if fresh:
                db.close()
                path.unlink(missing_ok=True)
            raise
    except (ConfigError, ProfileDBError, CatalogError, ShapeError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summaries, indent=2))
    else:
        for s in summaries:
            print(f"{s['model']} on {s['hardware']}: {s['rows']} step rows ({s['fit']}), "
                  f"start-up {s['startup_s']:.2f}s"
                  + (f", perplexity {s['perplexity']:.2f}" if "perplexity" in s else "")
                  + "".join(f", {r['method']} acceptance on {r['workload']} "
                            f"{r['acceptance']:.2f}" for r in s.get("speculation", []))
                  + f" -> {db.path}")
    return 0


def _spec_inputs_problem(args) -> str | None:
    """Why ``--spec-text`` or ``--spec-draft`` cannot be used, or None."""
    if args.spec_text:
        try:
            Path(args.spec_text).read_bytes().decode("utf-8")
        except OSError as e:
            return f"--spec-text {args.spec_text}: cannot read: {e.strerror}"
        except UnicodeDecodeError as e:
            return f"--spec-text {args.spec_text}: not UTF-8 text (byte {e.object[e.start]:#04x})"
    if args.spec_draft and not Path(args.spec_draft).is_dir():
        return f"--spec-draft {args.spec_draft}: no such checkpoint folder"
    return None


@contextlib.contextmanager
def staged_copy(db):
    """A copy of ``db`` (a ProfileDB) beside it to write a run's rows into,
    moved over the original when the block ends normally and removed when
    it raises (an error, Ctrl-C): the database holds every row of a run or
    none of it. Rows another process writes to the database meanwhile are
    lost; profile one run at a time."""
    from splitserve.cluster.cli.common import interrupts_deferred
    from splitserve.cluster.planning.db import ProfileDB, ProfileDBError

    if str(db.path) == ":memory:":
        yield db
        return
    tmp = db.path.with_name(f".{db.path.name}.{os.getpid()}.partial")
    staged = None
    try:
        try:
            dst = sqlite3.connect(str(tmp))
            with dst:
                db.conn.backup(dst)
            dst.close()
        except sqlite3.Error as e:
            raise ProfileDBError(f"{tmp}: cannot stage a copy of {db.path}: {e}") from None
        staged = ProfileDB(tmp)
        yield staged
        with interrupts_deferred():
            staged.close()
            db.close()
            try:
                os.replace(tmp, db.path)
            except OSError as e:
                raise ProfileDBError(f"{db.path}: cannot replace it with the new rows: "
                                     f"{e.strerror}") from None
    finally:
        if staged is not None:
            staged.close()
        tmp.unlink(missing_ok=True)


def _spec_import(args, db) -> int:
    from splitserve.cluster.planning.shapes import shape_from_config_json
    from splitserve.cluster.planning.spec_probe import from_bench_record
    from splitserve.engine.default_model import DEFAULT_MODEL_NAME, default_model_path

    try:
        rows = from_bench_record(args.spec_import)
    except (ValueError, KeyError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # bench_spec runs the default model pair
    shape = shape_from_config_json(default_model_path(), DEFAULT_MODEL_NAME)
    for r in rows:
        db.add_speculation(shape, r)
        print(f"{DEFAULT_MODEL_NAME}: {r.method} on {r.workload}, k={r.k}: per-token acceptance "
              f"{r.acceptance:.2f} (drafted tokens accepted {r.acceptance_rate:.2f}, mean "
              f"accepted length {r.mean_accepted_length:.2f}) -> {db.path}")
    return 0


def _serving(args, db) -> int:
    from dataclasses import asdict

    from splitserve.cluster.planning import serving_probe

    if not args.config:
        print("error: --serving-url needs --config (the config the cluster serves)",
              file=sys.stderr)
        return 2
    try:
        o = serving_probe.measure(args.config, db, args.serving_url, args.api_key,
                                  log=lambda s: print(s, file=sys.stderr, flush=True))
    except (RuntimeError, OSError) as e:
        print(f"error: the serving probe failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(o), indent=2))
    else:
        print(f"serving path ({o.layout}): {o.per_step_s * 1e3:.2f} ms per decode step + "
              f"{o.per_seq_s * 1e3:.2f} ms per sequence, {o.per_request_s * 1e3:.1f} ms per "
              f"request, from {o.requests} probe requests -> {db.path}")
    return 0


def _list(db, as_json: bool) -> int:
    hw = [db.hardware(k) for k in db.hardware_keys()]
    out = {"db": str(db.path),
           "hardware": [{"key": h.key, "provenance": h.provenance, "name": h.name,
                         "price_per_hour": h.price_per_hour, "price_source": h.price_source}
                        for h in hw],
           "step_time_profiles": db.profiled(),
           "speculation": db.speculation_summary()}
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"profile database {db.path}")
    print("hardware (best row per key):")
    for h in out["hardware"]:
        price = f"${h['price_per_hour']:.2f}/h" if h["price_per_hour"] is not None else "no price"
        print(f"  {h['key']:<40} {h['provenance']:<9} {price}")
    print("step-time profiles:")
    for p in out["step_time_profiles"]:
        print(f"  {p['model']:<24} {p['hardware_key']:<40} {p['settings']} ({p['provenance']}, "
              f"{p['rows']} rows)")
    if out["speculation"]:
        print("speculation acceptance (newest per model, method, draft, workload, k):")
        for r in out["speculation"]:
            print(f"  {r['model']:<24} {r['method']:<6} {r['draft']:<28} {r['workload']:<10} "
                  f"k={r['k']} per-token {r['acceptance']:.2f} ({r['provenance']})")
    return 0


# -- simulate ------------------------------------------------------------------------
def _add_simulate(sub) -> None:
    from splitserve.cluster.planning.sim.cli_args import add_simulate_arguments

    p = sub.add_parser(
        "simulate", help="simulate a cluster config on a workload (router and autoscaler as deployed)",
        description="Discrete-event simulation of an operator config: the production RouterCore\n"
                    "places every request, the production autoscaling decision sizes every pool,\n"
                    "and each replica runs the engine's own Scheduler and KV block manager with\n"
                    "step times from the profile database (measured where profiled, else a\n"
                    "roofline of datasheet figures). Deterministic for a seed. Prints a summary;\n"
                    "--out DIR writes record.json, requests.csv and simulation.png.\n"
                    "docs/planning.md explains inputs, outputs and what is modelled.")
    add_simulate_arguments(p)
    _db_arg(p)
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    from splitserve.cluster.planning.sim.cli_args import run_from_args

    return run_from_args(args)
