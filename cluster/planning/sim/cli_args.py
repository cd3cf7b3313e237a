"""``splitserve simulate``'s arguments and their translation into a
``Simulation`` (the subcommand itself is registered in cluster/cli)."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = """examples:
  # the local CPU cluster on this machine's measured profile (run `splitserve profile` first)
  splitserve simulate --config deploy/configs/local.yaml --hardware local \\
      --rate 4 --input-len uniform:64:256 --output-len 64 --num-requests 500 --out sim-local

  # Llama-3-8B on derived H100 profiles, a Mooncake trace, one decode replica failing at 120 s
  splitserve simulate --config deploy/configs/gpu-llama3-8b.yaml --shape llama-3.1-8b \\
      --hardware h100-sxm --trace cluster/planning/samples/mooncake_sample.jsonl \\
      --failure 120:decode --out sim-h100

  # a day of diurnal traffic, prefill on H100 and decode on H200
  splitserve simulate --config deploy/configs/gpu-llama3-8b.yaml --shape llama-3.1-8b \\
      --pool-hardware prefill=h100-sxm --pool-hardware decode=h200 --rate 20 \\
      --diurnal 86400:1.8:0.2 --duration 86400 --input-len lognormal:6.5:0.8 \\
      --output-len lognormal:5:0.7 --progress --out sim-day
"""


# the synthetic workload's flags and their defaults: a --trace takes none of them
MIN_SAMPLE_S = 1e-3  # the timeline's finest step
MAX_SAMPLES = 10_000_000  # timeline points over a synthetic run's arrivals
SYNTHETIC = {"input_len": "uniform:64:512", "output_len": "128", "burstiness": 1.0,
             "diurnal": None, "prefix_groups": 0, "prefix_tokens": 0}


def add_simulate_arguments(p) -> None:
    import argparse

    from splitserve.cluster.cli.common import positive

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    c = p.add_argument_group("cluster")
    c.add_argument("--config", required=True, metavar="FILE",
                   help="operator YAML, the same file `splitserve deploy` takes")
    c.add_argument("--model", default=None, help="model the workload asks for (default: the first)")
    c.add_argument("--shape", action="append", default=[], metavar="[MODEL=]PRESET|DIR",
                   help="model shape: a preset (llama-3.1-8b, llama-3.1-70b, llama-3.2-1b, "
                        "qwen2.5-7b, mixtral-8x7b, qwen3-next-80b-a3b) or a checkpoint folder; "
                        "default: the model's "
                        "path in the config, or the embedded default model when the path is null")
    c.add_argument("--hardware", default="local", metavar="KEY",
                   help="hardware of every pool: a catalog key (h100-sxm, h200, a100-80gb, l40s, "
                        "mi300x), a measured key, or 'local' (this CPU, at each pool's num_cpus "
                        "threads; needs `splitserve profile`) (default: %(default)s)")
    c.add_argument("--pool-hardware", action="append", default=[], metavar="[MODEL:]ROLE=KEY",
                   help="hardware of one pool (role: prefill, decode, colocated); repeatable")
    c.add_argument("--gpus-per-node", type=positive(int), default=8, metavar="N",
                   help="devices per node (default: 8)")
    c.add_argument("--node-provision-s", type=positive(float, allow_zero=True), default=0.0,
                   metavar="S",
                   help="delay of a new node when no free device slot exists (default: 0)")
    w = p.add_argument_group("workload (a trace file, or synthetic arrivals)")
    w.add_argument("--trace", default=None, metavar="FILE",
                   help=".jsonl Mooncake trace (timestamp ms, input_length, output_length, "
                        "hash_ids) or .csv Azure trace (TIMESTAMP, ContextTokens, GeneratedTokens)")
    w.add_argument("--time-scale", type=positive(float), default=1.0, metavar="X",
                   help="multiply the trace's gaps (0.5 = twice the rate)")
    w.add_argument("--rate", type=positive(float), default=None, metavar="R",
                   help="synthetic: mean requests/s")
    w.add_argument("--burstiness", type=positive(float), default=SYNTHETIC["burstiness"],
                   metavar="SHAPE",
                   help="synthetic: gamma shape of the gaps (1 = Poisson)")
    w.add_argument("--input-len", default=SYNTHETIC["input_len"], help="synthetic: prompt length "
                   "distribution, as `splitserve bench` writes it (default: %(default)s)")
    w.add_argument("--output-len", default=SYNTHETIC["output_len"],
                   help="synthetic: output length distribution, same forms")
    w.add_argument("--diurnal", default=None, metavar="PERIOD:PEAK:TROUGH",
                   help="synthetic: rate follows a day curve, e.g. 86400:1.6:0.4 (peak and "
                        "trough as multiples of --rate; lowest at t=0)")
    w.add_argument("--prefix-groups", type=positive(int, allow_zero=True), default=0, metavar="G",
                   help="synthetic: shared system prompts (Zipf-popular)")
    w.add_argument("--prefix-tokens", type=positive(int, allow_zero=True), default=0,
                   metavar="T", help="synthetic: their length in tokens")
    w.add_argument("--num-requests", type=positive(int), default=None, metavar="N",
                   help="stop after this many requests (default: the whole trace)")
    w.add_argument("--duration", type=positive(float), default=None, metavar="S",
                   help="stop arrivals after these seconds (default: the whole trace)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=positive(int, allow_zero=True), default=0,
                   help="seed of synthetic arrivals and lengths")
    r.add_argument("--failure", action="append", default=[], metavar="TIME:POOL[:COUNT]",
                   help="kill COUNT replicas of POOL (app name or role) at TIME s; repeatable")
    r.add_argument("--replace-after-s", type=positive(float, allow_zero=True), default=10.0,
                   metavar="S",
                   help="a failed replica is replaced after this (default: 10)")
    r.add_argument("--replica-start-s", type=positive(float, allow_zero=True), default=None,
                   metavar="S",
                   help="a new replica's start-up, launch to serving (default: the profile's; "
                        "a measured CPU profile holds the engine build only, without the Serve "
                        "replica's process start)")
    r.add_argument("--control-interval-s", type=positive(float), default=0.5, metavar="S",
                   help="autoscaling policy ticks (default: 0.5)")
    r.add_argument("--sample-s", type=positive(float), default=None, metavar="S",
                   help="timeline resolution (default: 1 s, coarser for long runs)")
    r.add_argument("--no-coalesce", action="store_true",
                   help="step every replica token by token (slow; for checking)")
    r.add_argument("--kv-block-scale", type=positive(int), default=1, metavar="K",
                   help="simulate KV blocks K times larger and K times fewer (same memory): "
                        "faster for large clusters, prefix hits and memory rounded to K blocks "
                        "(default: 1, exact)")
    r.add_argument("--spec-acceptance", type=float, default=None, metavar="RATE",
                   help="speculative decoding: the chance a draft token is accepted (after "
                        "the ones before it), for both methods (default: the profile "
                        "database's measured rate for the model and method, else the "
                        "assumed 0.7)")
    r.add_argument("--spec-workload", default=None, metavar="KIND",
                   help="which measured acceptance rows to use: the workload kind they were "
                        "measured on (code-edit, free, or an imported dataset's name); default: "
                        "the lowest measured")
    r.add_argument("--draft-cost-ratio", type=positive(float, allow_zero=True), default=None,
                   metavar="R",
                   help="speculative method draft: a draft-model step's time relative to "
                        "the model's (default: 0.1)")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="write record.json, requests.csv and simulation.png here")
    r.add_argument("--no-plot", action="store_true", help="with --out: no simulation.png")
    r.add_argument("--progress", action="store_true", help="a progress line on stderr")
    r.add_argument("--json", action="store_true", help="print the record as JSON")


def _parse_pool_hardware(items: list[str], default: str):
    table: dict[tuple[str | None, str], str] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--pool-hardware {item!r}: expected [MODEL:]ROLE=KEY")
        lhs, key = item.split("=", 1)
        model, _, role = lhs.rpartition(":")
        if role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"--pool-hardware {item!r}: role must be prefill, decode or colocated")
        table[(model or None, role)] = key

    def hardware(model: str, role: str) -> str:
        return table.get((model, role)) or table.get((None, role)) or default

    return hardware


def shapes_for(cfg, items: list[str]):
    """Each model's shape: ``--shape`` items, else its checkpoint's config.json."""
    from splitserve.cluster.planning.shapes import resolve_shape, shape_from_config_json
    from splitserve.engine.default_model import DEFAULT_MODEL_NAME, default_model_path

    given: dict[str | None, str] = {}
    for item in items:
        model, sep, spec = item.partition("=")
        given[model if sep else None] = spec if sep else model
    out = {}
    for served in cfg.models:
        name = served.model.name
        spec = given.get(name) or given.get(None)
        if spec:
            out[name] = resolve_shape(spec)
        elif served.model.path is None:
            out[name] = shape_from_config_json(default_model_path(), DEFAULT_MODEL_NAME)
        elif Path(served.model.path).exists():
            out[name] = shape_from_config_json(served.model.path, name)
        else:
            raise ValueError(f"model {name!r}: its path {served.model.path} is not on this "
                             "machine; give its shape with --shape NAME=PRESET (e.g. llama-3.1-8b)")
    return out


def _failures(items: list[str]):
    from splitserve.cluster.planning.sim.options import Failure

    import math

    out = []
    for item in items:
        parts = item.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            f = Failure(float(parts[0]), parts[1], int(parts[2]) if len(parts) == 3 else 1)
        except ValueError:
            raise ValueError(f"--failure {item!r}: expected TIME:POOL[:COUNT]") from None
        if not (math.isfinite(f.at_s) and f.at_s >= 0 and f.count >= 1):
            raise ValueError(f"--failure {item!r}: TIME must be a finite number of seconds >= 0 "
                             "and COUNT an integer >= 1")
        out.append(f)
    return tuple(out)


def workload_from_args(args):
    from splitserve.cluster.bench.datasets import parse_length_dist
    from splitserve.cluster.planning.workload import Diurnal, PrefixSpec, read_trace, synthetic

    if args.trace and args.rate:
        raise ValueError("give --trace or --rate, not both")
    if args.trace:
        check_no_synthetic_flags(args)
        it = read_trace(args.trace, args.time_scale)
        if args.num_requests is not None or args.duration is not None:
            it = _limit(it, args.num_requests, args.duration)
        return it, f"trace {args.trace} (time scale {args.time_scale:g})"
    if not args.rate:
        raise ValueError("give a workload: --trace FILE, or --rate R with --num-requests or "
                         "--duration")
    if args.num_requests is None and args.duration is None:
        raise ValueError("synthetic arrivals need --num-requests or --duration")
    check_span(args.rate, args.num_requests, "--num-requests", args.duration)
    diurnal = Diurnal.parse(args.diurnal) if args.diurnal else None
    prefix = PrefixSpec.from_flags(args.prefix_groups, args.prefix_tokens)
    it = synthetic(args.rate, parse_length_dist(args.input_len), parse_length_dist(args.output_len),
                   seed=args.seed, num_requests=args.num_requests, duration_s=args.duration,
                   burstiness=args.burstiness, diurnal=diurnal, prefix=prefix)
    desc = (f"synthetic {args.rate:g} req/s (burstiness {args.burstiness:g}), input "
            f"{args.input_len}, output {args.output_len}"
            + (f", diurnal {args.diurnal}" if diurnal else "")
            + (f", {args.prefix_groups} shared prefixes of {args.prefix_tokens} tokens"
               if prefix else ""))
    return it, desc


def check_no_synthetic_flags(args) -> None:
    """With a trace: ValueError naming each synthetic-workload flag given
    (it would be ignored: the trace brings its own lengths and arrivals)."""
    given = [f"--{k.replace('_', '-')}" for k, v in SYNTHETIC.items() if getattr(args, k) != v]
    if given:
        raise ValueError(f"{', '.join(given)}: synthetic arrivals only; a --trace brings its "
                         "own lengths and arrival times")


def check_span(rate: float, count: int | None, count_flag: str,
               duration: float | None = None) -> None:
    """ValueError when ``count`` synthetic arrivals at ``rate`` (or
    ``duration``) would span more than a trace may: a unit slip, and a
    simulation without end."""
    from splitserve.cluster.planning.workload import MAX_SPAN_S

    span = min(duration or float("inf"), (count or float("inf")) / rate)
    if span > MAX_SPAN_S:
        what = (f"--duration {duration:g} s" if span == duration else
                f"{count_flag} {count} at --rate {rate:g} span about {span:.3g} s, which")
        raise ValueError(f"{what} is more than {MAX_SPAN_S / 86400:.0f} days of arrivals")


def check_sample(sample_s: float, args) -> None:
    """ValueError when the timeline's step would make more points than a run
    can hold (each is an event): --sample-s 1e-9 ran without end."""
    if sample_s < MIN_SAMPLE_S:
        raise ValueError(f"--sample-s {sample_s:g}: the timeline's step is at least "
                         f"{MIN_SAMPLE_S:g} s")
    span = args.duration or (args.num_requests / args.rate if args.rate and args.num_requests
                             else None)
    if span and span / sample_s > MAX_SAMPLES:
        raise ValueError(f"--sample-s {sample_s:g}: {span / sample_s:.3g} timeline points over "
                         f"{span:g} s of arrivals, more than {MAX_SAMPLES}; raise --sample-s")


def _limit(it, n, duration):
    for i, r in enumerate(it):
        if (n is not None and i >= n) or (duration is not None and r.arrival_s > duration):
            return
        yield r


def run_from_args(args) -> int:
    import itertools
    import json

    from splitserve.cluster.bench.datasets import DatasetError
    from splitserve.cluster.config import ConfigError, load_config
    from splitserve.cluster.planning.db import ProfileDB, ProfileDBError
    from splitserve.cluster.planning.shapes import ShapeError
    from splitserve.cluster.planning.sim import report
    from splitserve.cluster.planning.sim.options import SimConfigError, SimOptions
    from splitserve.cluster.planning.sim.simulator import Simulation
    from splitserve.cluster.planning.workload import TraceError

    from splitserve.cluster.cli.common import output_problem

    problem = output_problem("--out", args.out, folder=True)  # before the run, not after it
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        shapes = shapes_for(cfg, args.shape)
        hardware = _parse_pool_hardware(args.pool_hardware, args.hardware)
        workload, desc = workload_from_args(args)
        first = next(workload, None)  # a run of nothing would print NaNs and exit 0
        if first is None:
            raise ValueError(f"no request arrives: --rate {args.rate:g} over --duration "
                             f"{args.duration:g} s brings none; raise --rate or --duration")
        workload = itertools.chain([first], workload)
        sample_s = args.sample_s or (max(1.0, args.duration / 3000) if args.duration else 1.0)
        check_sample(sample_s, args)
        spec = {}
        if args.spec_acceptance is not None:
            if not 0.0 <= args.spec_acceptance <= 1.0:
                raise ValueError(f"--spec-acceptance must be in [0, 1], got {args.spec_acceptance}")
            spec.update(spec_acceptance_ngram=args.spec_acceptance,
                        spec_acceptance_draft=args.spec_acceptance)
        if args.draft_cost_ratio is not None:
            if args.draft_cost_ratio < 0:
                raise ValueError("--draft-cost-ratio must be at least 0")
            spec["draft_cost_ratio"] = args.draft_cost_ratio
        if args.spec_workload:
            spec["spec_workload"] = args.spec_workload
        opts = SimOptions(seed=args.seed, control_interval_s=args.control_interval_s,
                          sample_s=sample_s, node_provision_s=args.node_provision_s,
                          replace_after_s=args.replace_after_s,
                          replica_start_s=args.replica_start_s,
                          devices_per_node=args.gpus_per_node, coalesce=not args.no_coalesce,
                          kv_block_scale=args.kv_block_scale,
                          failures=_failures(args.failure), progress=args.progress, **spec)
        db = ProfileDB(args.db)
        sim = Simulation(cfg, shapes, hardware, db, workload, opts, model=args.model)
        result = sim.run()
    except (ConfigError, ProfileDBError, ShapeError, SimConfigError, TraceError, DatasetError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rec = result.record
    rec["workload"] = desc
    rec["config_file"] = str(args.config)
    if args.out:
        from splitserve.cluster.cli.common import interrupts_deferred

        out = Path(args.out)
        try:
            with interrupts_deferred():  # the files whole, even when Ctrl-C comes now
                out.mkdir(parents=True, exist_ok=True)
                report.write_json(rec, out / "record.json")
                report.write_requests_csv(sim.log, out / "requests.csv")
                if not args.no_plot:
                    report.plot(rec, out / "simulation.png")
        except OSError as e:
            print(f"error: --out {out}: cannot write: {e.strerror or e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(report._clean(rec), indent=1))
    else:
        print(report.text_summary(rec))
        if args.out:
            print(f"wrote {Path(args.out) / 'record.json'}, requests.csv"
                  + ("" if args.no_plot else ", simulation.png"))
    return 0
