"""``splitserve plan``: choose a deployment for a workload across quality,
speed and cost (docs/planning.md, "Planning a deployment")."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from splitserve.cluster.cli.common import fraction, interrupts_deferred, output_problem, positive
from splitserve.cluster.cli.plan_space import (KV_DTYPES, LAYOUTS, POLICIES, WEIGHT_DTYPES,
                                               space_from_args)
from splitserve.cluster.planning.sim.cli_args import (SYNTHETIC, check_no_synthetic_flags,
                                                      check_span)

EXAMPLES = """examples:
  # Llama-3.1-8B chat on H100s and L40s (derived profiles), 40 req/s
  splitserve plan --shape llama-3.1-8b --hardware h100-sxm:16 --hardware l40s:16 \\
      --rate 40 --input-len lognormal:5.5:0.6 --output-len lognormal:6:0.5 \\
      --ttft 500ms@p90 --tpot 40ms@p90 --out plan-chat

  # a trace, a budget, and fp8 KV allowed if it costs at most 1% perplexity
  splitserve plan --shape llama-3.1-8b --trace cluster/planning/samples/mooncake_sample.jsonl \\
      --ttft 2@p90 --tpot 50ms@p90 --max-ppl-increase 1% --budget 40 --out plan-trace

  # re-plan a running cluster from what `splitserve bench` observed
  splitserve plan --current deploy/configs/gpu-llama3-8b.yaml --shape llama-3.1-8b \\
      --observed bench.json --hardware h100-sxm:16 --out replan
"""


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "plan", help="choose a deployment (layout, pools, engine settings) for a workload",
        description="Search layouts, hardware, replicas, engine settings, router and "
                    "autoscaling for the cheapest deployment that meets TTFT/TPOT SLOs and a "
                    "quality floor: bounds prune the space, a vectorised analytic model scores "
                    "the rest, and the cheapest candidates run in the simulator (the production "
                    "router, autoscaler and scheduler). Prints the Pareto front over quality, "
                    "speed and cost and why the choice won, and writes the chosen operator "
                    "YAML, which `splitserve deploy` takes unchanged.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint folder (its config.json gives the shape; the YAML serves it)")
    m.add_argument("--shape", default=None, metavar="NAME",
                   help="a shape preset (llama-3.1-8b, llama-3.1-70b, llama-3.2-1b, qwen2.5-7b, "
                        "mixtral-8x7b, qwen3-next-80b-a3b) or a model in the profile database; "
                        "default: the current "
                        "config's model, else the embedded default model")
    m.add_argument("--served-name", default=None,
                   help="model name clients ask for (default: the current config's, else "
                        "--shape or the checkpoint folder's name)")
    m.add_argument("--model-path", default=None,
                   help="checkpoint path written into the YAML (default: --model, or "
                        "/models/<shape>)")
    w = p.add_argument_group("workload (one of: a trace, a bench record, or distributions)")
    w.add_argument("--trace", default=None, metavar="FILE",
                   help="Mooncake .jsonl or Azure .csv trace")
    w.add_argument("--time-scale", type=positive(float), default=1.0, metavar="X",
                   help="with --trace: multiply its gaps (0.5 = twice the rate)")
    w.add_argument("--observed", action="append", default=None, metavar="BENCH.json|URL",
                   help="a `splitserve bench` JSON record (the requests it sent), or a running "
                        "cluster's metrics endpoint (http://HOST:PORT): its /metrics is scraped "
                        "twice, --observed-window apart, for the request rate and the prompt "
                        "and output lengths of the requests that finished in between. "
                        "Repeatable for URLs, whose counts are summed: with several ingress "
                        "replicas give every node's Ray metrics endpoint (each replica counts "
                        "its own requests there), not the API port")
    w.add_argument("--observed-run", type=int, default=-1, metavar="I",
                   help="which run of a bench record's sweep (-1: the last)")
    w.add_argument("--observed-window", type=positive(float), default=60.0, metavar="S",
                   help="seconds between the two scrapes of a URL (default: %(default)s)")
    w.add_argument("--observed-model", default=None,
                   help="the model whose traffic a URL's metrics describe (default: the only "
                        "one with traffic)")
    w.add_argument("--api-key", default=os.environ.get("SPLITSERVE_API_KEY"),
                   help="API key for a URL's /metrics (default: $SPLITSERVE_API_KEY)")
    w.add_argument("--rate", type=positive(float), default=None, metavar="R",
                   help="synthetic workload: mean requests/s")
    w.add_argument("--input-len", default=SYNTHETIC["input_len"],
                   help="synthetic: prompt tokens, N | uniform:LO:HI | normal:MEAN:STD[:LO:HI] | "
                        "lognormal:MU:SIGMA[:LO:HI]")
    w.add_argument("--output-len", default=SYNTHETIC["output_len"],
                   help="synthetic: output tokens, same forms")
    w.add_argument("--burstiness", type=positive(float), default=SYNTHETIC["burstiness"],
                   metavar="SHAPE",
                   help="synthetic: gamma shape of the gaps (1 = Poisson, < 1 burstier)")
    w.add_argument("--diurnal", default=None, metavar="PERIOD:PEAK:TROUGH",
                   help="rate follows a day curve (peak and trough as multiples of --rate): "
                        "the plan holds the SLOs at the peak and may scale down in troughs")
    w.add_argument("--prefix-groups", type=positive(int, allow_zero=True), default=0, metavar="G",
                   help="synthetic: shared system prompts (Zipf-popular); 0: none")
    w.add_argument("--prefix-tokens", type=positive(int, allow_zero=True), default=0,
                   metavar="T", help="synthetic: the shared prompts' length in tokens")
    w.add_argument("--sim-requests", type=positive(int), default=800, metavar="N",
                   help="requests each simulation replays (the busiest stretch of a trace, or "
                        "arrivals at the peak rate) (default: %(default)s)")
    o = p.add_argument_group("objectives and constraints")
    o.add_argument("--ttft", default=None, metavar="S[@pPCT]",
                   help="TTFT SLO, e.g. 0.5@p90 or 200ms@p99 (default: the current config's "
                        "slo.ttft_s, else 1 s; percentile p90)")
    o.add_argument("--tpot", default=None, metavar="S[@pPCT]",
                   help="TPOT SLO (default: the current config's slo.tpot_s, else 0.1 s)")
    o.add_argument("--max-ppl-increase", default="0", metavar="FRACTION|PCT%|none",
                   help="largest perplexity increase allowed against the reference dtypes "
                        "(bf16 weights and KV), from the database's quality rows; settings "
                        "without rows are unknown and excluded while a floor is set (default: "
                        "0, the reference only; 'none': no floor)")
    o.add_argument("--hardware", action="append", default=[], metavar="KEY[:COUNT[:PRICE]]",
                   help="devices on offer: a hardware key (catalog GPUs, or 'local' for this "
                        "CPU, one thread per replica), how many may be used (default 16), "
                        "price per device-hour (default: the database's); repeatable "
                        "(default: every GPU in the database)")
    o.add_argument("--budget", type=positive(float), default=None, metavar="USD_PER_HOUR",
                   help="most a plan may cost per hour at the peak (default: no limit)")
    s = p.add_argument_group("search space (comma-separated values)")
    s.add_argument("--layouts", default="colocated,disaggregated", metavar="LIST",
                   help="of: " + ", ".join(LAYOUTS))
    s.add_argument("--max-num-seqs", default="32,64,128,256,512", metavar="LIST",
                   help="sequences one replica runs at once")
    s.add_argument("--max-num-batched-tokens", default="512,1024,2048,4096,8192,16384",
                   metavar="LIST", help="token budgets of one engine step (prompt chunk size)")
    s.add_argument("--block-sizes", default="16,32", metavar="LIST", help="tokens per KV block")
    s.add_argument("--kv-dtypes", default="auto,fp8", metavar="LIST",
                   help="KV cache dtypes, of: " + ", ".join(KV_DTYPES))
    s.add_argument("--weight-dtypes", default="bfloat16,fp8", metavar="LIST",
                   help="weight dtypes, of: " + ", ".join(WEIGHT_DTYPES))
    s.add_argument("--tensor-parallel", default="1,2,4", metavar="LIST",
                   help="tensor-parallel degrees of a replica")
    s.add_argument("--speculative", default="off,ngram:4", metavar="LIST",
                   help="speculative decoding: off or METHOD:K (K draft tokens), e.g. ngram:4")
    s.add_argument("--spec-workload", default=None, metavar="KIND",
                   help="the workload's kind for speculation acceptance: the profile "
                        "database's rows measured on it (code-edit, free, or an imported "
                        "dataset's name); default: the lowest measured rate of the model, "
                        "else the assumed 0.7")
    s.add_argument("--spec-acceptance", type=fraction, default=None, metavar="RATE",
                   help="per-token acceptance of the drafts (0 to 1) for every method, instead "
                        "of the database's (the plan reports it as given)")
    s.add_argument("--policies", default="cost,prefix_aware,least_loaded,round_robin",
                   metavar="LIST", help="router policies, of: " + ", ".join(POLICIES))
    s.add_argument("--local-prefill", default="0,128,512,2048", metavar="LIST",
                   help="local-prefill thresholds (tokens) tried with the cost policy")
    s.add_argument("--autoscaling", default="fixed,scale-down,burst", metavar="LIST",
                   help="autoscaling styles, of: fixed, scale-down, burst")
    s.add_argument("--max-replicas", type=positive(int), default=32, metavar="N",
                   help="most replicas of one pool")
    r = p.add_argument_group("search")
    r.add_argument("--finalists", type=positive(int), default=10, metavar="N",
                   help="cheapest analytic candidates taken to simulation")
    r.add_argument("--max-sims", type=positive(int), default=24, metavar="N",
                   help="most simulations, finalists and their repairs together")
    r.add_argument("--time-budget", type=positive(float), default=110.0, metavar="S",
                   help="seconds of planning after which no new simulation starts "
                        "(default: %(default)s)")
    r.add_argument("--slack", type=positive(float), default=1.3, metavar="X",
                   help="candidates may be estimated up to this factor over the SLOs")
    r.add_argument("--kv-block-scale", type=positive(int), default=1, metavar="K",
                   help="simulate KV blocks K times larger and K times fewer (faster, rounded)")
    r.add_argument("--seed", type=positive(int, allow_zero=True), default=0,
                   help="seed of the workload and simulations")
    c = p.add_argument_group("re-planning")
    c.add_argument("--current", default=None, metavar="FILE",
                   help="the running cluster's operator YAML: simulate it on the workload, "
                        "propose a change and print the YAML diff; the plan keeps its other keys")
    c.add_argument("--current-hardware", default=None, metavar="KEY",
                   help="hardware the current config runs on (default: the first --hardware)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, metavar="DIR",
                     help="write plan.yaml, plan.json and pareto.png here")
    out.add_argument("--no-plot", action="store_true", help="with --out: no pareto.png")
    out.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--db", default=None, metavar="PATH",
                   help="profile database file (default: $SPLITSERVE_PROFILE_DB, else "
                        "~/.splitserve/profiles.db)")
    p.set_defaults(func=cmd_plan)


def _floor(text: str) -> float | None:
    t = text.strip().lower()
    if t in ("none", "off", ""):
        return None
    try:
        v = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"--max-ppl-increase {text!r}: expected a fraction (0.01), a "
                         "percentage (1%) or none") from None
    if not 0 <= v < float("inf"):
        raise ValueError(f"--max-ppl-increase {text!r}: must be >= 0")
    return v


def build_request(args, db):
    import yaml

    from splitserve.cluster.bench.datasets import parse_length_dist
    from splitserve.cluster.config import load_config
    from splitserve.cluster.planning.planner import inputs
    from splitserve.cluster.planning.planner.request import PlanRequest
    from splitserve.cluster.planning.shapes import (
        PRESETS, ShapeError, resolve_shape, shape_from_config_json)
    from splitserve.cluster.planning.workload import Diurnal, PrefixSpec

    current = current_cfg = None
    if args.current:
        current_cfg = load_config(args.current)
        current = yaml.safe_load(Path(args.current).read_text())
    # the model
    served = current_cfg.models[0].model if current_cfg else None
    if args.model:
        shape = shape_from_config_json(args.model)
        name, path = args.served_name or Path(args.model).name, args.model_path or args.model
    elif args.shape:
        shape = PRESETS.get(args.shape) or db.model(args.shape)
        if shape is None:
            shape = resolve_shape(args.shape)  # a folder, or the error naming the presets
        name = args.served_name or (served.name if served else args.shape)
        path = args.model_path or (served.path if served else f"/models/{args.shape}")
    elif served is not None and served.path and Path(served.path).exists():
        shape = shape_from_config_json(served.path, served.name)
        name, path = served.name, served.path
    elif served is not None and served.path:
        raise ShapeError(f"the current config's model path {served.path} is not on this "
                         "machine; give its shape with --shape (e.g. llama-3.1-8b)")
    else:
        from splitserve.engine.default_model import DEFAULT_MODEL_NAME, default_model_path

        shape = shape_from_config_json(default_model_path(), DEFAULT_MODEL_NAME)
        name, path = args.served_name or (served.name if served else "default"), None
    # SLOs
    ttft_default = f"{current_cfg.slo.ttft_s}" if current_cfg else "1.0"
    tpot_default = f"{current_cfg.slo.tpot_s}" if current_cfg else "0.1"
    ttft, ttft_pct = inputs.parse_slo(args.ttft or ttft_default)
    tpot, tpot_pct = inputs.parse_slo(args.tpot or tpot_default)
    slo = inputs.SLO(ttft, tpot, ttft_pct, tpot_pct)
    # workload
    given = [x for x in (args.trace, args.observed, args.rate) if x]
    if len(given) != 1:
        raise inputs.PlanInputError("give one workload: --trace FILE, --observed BENCH.json, or "
                                    "--rate R (with --input-len/--output-len)")
    if args.trace:
        check_no_synthetic_flags(args)
        wl = inputs.from_trace(args.trace, args.time_scale, window=args.sim_requests)
    elif args.observed and all(o.startswith(("http://", "https://")) for o in args.observed):
        wl = _observe(args)
    elif args.observed:
        if len(args.observed) > 1:
            raise inputs.PlanInputError("--observed more than once takes URLs only (metrics "
                                        "endpoints to sum), not bench records")
        wl = inputs.from_bench_record(args.observed[0], args.observed_run,
                                      window=args.sim_requests)
    else:
        check_span(args.rate, args.sim_requests, "--sim-requests")
        try:
            diurnal = Diurnal.parse(args.diurnal) if args.diurnal else None
            prefix = PrefixSpec.from_flags(args.prefix_groups, args.prefix_tokens)
        except ValueError as e:
            raise inputs.PlanInputError(str(e)) from None
        wl = inputs.synthetic_workload(
            args.rate, parse_length_dist(args.input_len), parse_length_dist(args.output_len),
            burstiness=args.burstiness, diurnal=diurnal, prefix=prefix, seed=args.seed,
            window=args.sim_requests,
            description=f"synthetic {args.rate:g} req/s, input {args.input_len}, output "
                        f"{args.output_len}" + (f", diurnal {args.diurnal}" if diurnal else ""))
    # hardware
    offers = [inputs.parse_offer(h) for h in args.hardware]
    if not offers:
        offers = [inputs.Offer(k, 16) for k in db.hardware_keys() if not k.startswith("cpu:")]
    space = space_from_args(args, shape)
    req = PlanRequest(shape=shape, model_name=name, model_path=path, workload=wl, slo=slo,
                      offers=offers, max_ppl_increase=_floor(args.max_ppl_increase),
                      budget_per_hour=args.budget, space=space, finalists=args.finalists,
                      max_sims=args.max_sims, time_budget_s=args.time_budget, slack=args.slack,
                      seed=args.seed, kv_block_scale=args.kv_block_scale, base_config=current,
                      spec_workload=args.spec_workload)
    return req, current_cfg


def _observe(args):
    """The workload a running cluster's /metrics shows over --observed-window
    (several endpoints: their counts summed, each scraped back to back)."""
    from splitserve.cluster.planning.observed import scrape_all, workload_from_scrapes
    from splitserve.cluster.planning.planner.inputs import PlanInputError

    if args.observed_window <= 0:
        raise PlanInputError("--observed-window must be > 0")
    before = scrape_all(args.observed, args.api_key)
    if not args.quiet:
        print(f"observing {', '.join(args.observed)} for {args.observed_window:g} s",
              file=sys.stderr, flush=True)
    time.sleep(args.observed_window)
    after = scrape_all(args.observed, args.api_key)
    wl, _ = workload_from_scrapes(before, after, args.observed_model, args.sim_requests,
                                  seed=args.seed)
    return wl


def cmd_plan(args) -> int:
    from splitserve.cluster.bench.datasets import DatasetError
    from splitserve.cluster.config import ConfigError
    from splitserve.cluster.planning.db import ProfileDB, ProfileDBError
    from splitserve.cluster.planning.planner import report
    from splitserve.cluster.planning.planner.emit import to_yaml
    from splitserve.cluster.planning.planner.inputs import PlanInputError
    from splitserve.cluster.planning.planner.search import Planner
    from splitserve.cluster.planning.shapes import ShapeError
    from splitserve.cluster.planning.workload import TraceError

    t0 = time.perf_counter()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    problem = output_problem("--out", args.out, folder=True)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        db = ProfileDB(args.db)
        req, current_cfg = build_request(args, db)
        planner = Planner(req, db, log=log)
        log(f"planning {req.model_name} for {req.workload.description}: {req.slo.describe()}")
        result = planner.search()
        current_out = None
        if current_cfg is not None:
            current_out = _simulate_current(planner, current_cfg, args.current_hardware, log)
    except (ConfigError, ProfileDBError, ShapeError, TraceError, DatasetError, PlanInputError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.timings["total_s"] = time.perf_counter() - t0
    result.explanation = report.explanation(result)
    front = report.pareto(result.outcomes, req.slo)
    yaml_text = to_yaml(result.chosen.plan, planner.emit_ctx) if result.chosen else None
    print(f"splitserve plan: {req.model_name} ({req.shape.name}), {req.workload.description}")
    floor = req.max_ppl_increase
    print(f"SLO: {req.slo.describe()}; quality floor: "
          + ("none" if floor is None else "the reference dtypes only" if floor == 0 else
             f"perplexity +{floor:.2%} at most") + "; hardware: "
          + ", ".join(f"{d.label} x{d.count} ${d.price:.2f}/h" for d in result.devices)
          + (f"; budget ${req.budget_per_hour:.2f}/h" if req.budget_per_hour else ""))
    if result.acceptance:
        print("speculation acceptance: " + "; ".join(
            f"{m} {a.describe()}" for m, a in sorted(result.acceptance.items())))
    print()
    print(report.counts_text(result))
    print(f"planned in {result.timings['total_s']:.1f} s wall "
          f"(analytic {result.timings.get('analytic_s', 0):.1f} s, simulation "
          f"{result.timings.get('simulation_s', 0):.1f} s)")
    print()
    print("Pareto front (simulated plans; quality, speed, cost):")
    print(report.table(front, req.slo, result.chosen))
    print()
    for line in result.explanation:
        print(line)
    out = Path(args.out) if args.out else None
    rec = report.record(result, front, yaml_text)
    if current_out is not None:
        from splitserve.cluster.planning.planner.replan import propose

        prop = propose(current_cfg, Path(args.current).read_text(), current_out, result.chosen,
                       yaml_text, args.current)
        rec["current"] = current_out.to_dict()
        rec["proposal"] = {"change": prop.change, "reason": prop.reason, "changes": prop.changes}
        print()
        print(f"Current config ({args.current}) on this workload: TTFT p{req.slo.ttft_pct:g} "
              f"{current_out.ttft_p * 1e3:.0f} ms, TPOT p{req.slo.tpot_pct:g} "
              f"{current_out.tpot_p * 1e3:.1f} ms, {'meets' if current_out.meets else 'misses'} "
              f"the SLOs, ${current_out.cost_per_hour:.2f}/h.")
        print(("Proposed change: " if prop.change else "No change: ") + prop.reason + ".")
        if prop.change:
            for line in prop.changes:
                print(f"  {line}")
            print(prop.diff)
    if out:
        try:
            with interrupts_deferred():  # the files whole, even when Ctrl-C comes now
                out.mkdir(parents=True, exist_ok=True)
                if current_out is not None and prop.change:
                    (out / "plan.diff").write_text(prop.diff)
                if yaml_text:
                    (out / "plan.yaml").write_text(yaml_text)
                report.write_json(rec, out / "plan.json")
                if not args.no_plot:
                    report.plot(result, front, out / "pareto.png")
        except OSError as e:
            print(f"error: --out {out}: cannot write: {e.strerror or e}", file=sys.stderr)
            return 2
        print()
        print(f"wrote {out / 'plan.yaml'}" if yaml_text
              else "no plan.yaml (nothing meets the SLOs)", end="")
        print(f", {out / 'plan.json'}" + ("" if args.no_plot else f", {out / 'pareto.png'}"))
    elif yaml_text:
        print()
        print(yaml_text)
    return 0 if result.chosen is not None else 1


def _simulate_current(planner, cfg, hardware_key, log):
    from splitserve.cluster.planning.planner.inputs import PlanInputError
    from splitserve.cluster.planning.planner.replan import plan_from_config

    devs = planner.devices
    dev = devs[0]
    if hardware_key:
        match = [d for d in devs if hardware_key in (d.key, d.sim_key)]
        if not match:
            raise PlanInputError(f"--current-hardware {hardware_key!r} is not among the offered "
                                 f"hardware {[d.sim_key for d in devs]}")
        dev = match[0]
    plan = plan_from_config(cfg, dev)
    log(f"  simulating the current config on {dev.label}")
    return planner.simulate(plan, cfg=cfg)
