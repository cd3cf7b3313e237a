"""``splitserve bench``: load a running endpoint and report the serving
statistics of docs/benchmarks.md (TTFT, TPOT, ITL, E2E, throughput, goodput).

    splitserve bench --url http://127.0.0.1:8000 --model default \\
        --rates 1,2,4 --input-len uniform:64:256 --output-len 64 \\
        --num-requests 200 --ttft-slo 0.25 --tpot-slo 0.1 --out bench.json --plot bench.png
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from splitserve.cluster.cli.common import (check_reachable, interrupts_deferred, output_problem,
                                           positive)

from splitserve.cluster.bench.datasets import DatasetError, load_sharegpt, parse_length_dist, synthetic_requests

DEFAULT_OUTPUT_LEN = "64"


def add_subcommand(sub) -> None:
    """Add ``bench`` to the ``splitserve`` subcommands (argparse subparsers)."""
    p = sub.add_parser(
        "bench", help="measure a running endpoint: latency percentiles, throughput, goodput",
        description="Send a workload to a splitserve endpoint (OpenAI HTTP or gRPC) on a Poisson "
                    "or gamma arrival schedule, or at fixed concurrency, and report TTFT, TPOT, "
                    "ITL and E2E (mean, p50, p90, p99), request and token throughput, goodput and "
                    "SLO attainment. Requests use greedy sampling and ignore EOS so each produces "
                    "exactly its output length.")
    where = p.add_argument_group("endpoint")
    where.add_argument("--url", default="http://127.0.0.1:8000",
                       help="base URL of the OpenAI HTTP API (default: %(default)s)")
    where.add_argument("--grpc", default=None, metavar="HOST:PORT",
                       help="use the gRPC API at this address instead of HTTP")
    where.add_argument("--model", default="default", help="served model name (default: %(default)s)")
    where.add_argument("--api-key", default=os.environ.get("SPLITSERVE_API_KEY"),
                       help="client API key (default: $SPLITSERVE_API_KEY)")
    where.add_argument("--timeout", type=positive(float), default=600.0, metavar="S",
                       help="seconds one request may take before it counts as failed "
                            "(default: %(default)s)")
    load = p.add_argument_group("load")
    rate = load.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=positive(float), default=None,
                      help="offered request rate in req/s (default: inf, all requests at once)")
    rate.add_argument("--rates", default=None, metavar="R1,R2,...",
                      help="sweep: one run per rate, e.g. 1,2,4 (inf allowed)")
    load.add_argument("--concurrency", type=positive(int), default=None, metavar="N",
                      help="at most this many requests in flight; alone (no rate): a closed loop "
                           "of this many clients")
    load.add_argument("--burstiness", type=positive(float), default=1.0, metavar="SHAPE",
                      help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, "
                           ">1 more even (default: %(default)s)")
    load.add_argument("--num-requests", default="100", metavar="N | N1,N2,...",
                      help="requests per run, or one count per rate of --rates (a load step: "
                           "--rates 1,8 --num-requests 10,80); runs follow each other "
                           "(default: %(default)s)")
    load.add_argument("--seed", type=positive(int, allow_zero=True), default=0,
                      help="seed of lengths, prompts and arrivals (default: %(default)s)")
    data = p.add_argument_group("workload")
    data.add_argument("--dataset", default=None, metavar="FILE",
                      help="ShareGPT-format JSON file (default: synthetic prompts)")
    data.add_argument("--tokenizer", default=None, metavar="DIR",
                      help="checkpoint folder whose tokenizer counts ShareGPT lengths "
                           "(default: estimate 4 characters per token)")
    data.add_argument("--input-len", default="uniform:32:256",
                      help="synthetic prompt tokens: N | uniform:LO:HI | normal:MEAN:STD[:LO:HI] | "
                           "lognormal:MU:SIGMA[:LO:HI] (default: %(default)s)")
    data.add_argument("--output-len", default=None,
                      help="output tokens, same forms (default: 64; with --dataset: each "
                           "reply's length, or this fixed number when given)")
    data.add_argument("--token-range", default="10:500", metavar="LO:HI",
                      help="synthetic prompt token ids are drawn from [LO, HI) "
                           "(default: %(default)s)")
    slo = p.add_argument_group("SLOs and output")
    slo.add_argument("--ttft-slo", type=positive(float), default=1.0, metavar="S",
                     help="TTFT target in seconds (default: %(default)s)")
    slo.add_argument("--tpot-slo", type=positive(float), default=0.2, metavar="S",
                     help="TPOT target in seconds (default: %(default)s)")
    slo.add_argument("--out", default=None, metavar="FILE.json", help="write the JSON record here")
    slo.add_argument("--plot", default=None, metavar="FILE.png",
                     help="write latency percentiles and goodput against rate here (matplotlib)")
    slo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_bench)


def _requests(args, run: int, count: int):
    """Run ``run``'s ``count`` requests: seeded by ``--seed`` + run, so each run of a sweep
    has its own prompts (no prefix-cache hits across runs)."""
    seed = args.seed + run
    if args.dataset:
        count_tokens = None
        if args.tokenizer:
            from splitserve.engine.tokenizer import Tokenizer

            tok = Tokenizer.from_dir(args.tokenizer)
            count_tokens = lambda text: len(tok.encode(text))  # noqa: E731
        out = None
        if args.output_len is not None:
            dist = parse_length_dist(args.output_len)
            if dist.kind != "fixed":
                raise DatasetError("with --dataset, --output-len must be a fixed number")
            out = dist.low
        return load_sharegpt(args.dataset, count, seed, count_tokens, output_len=out)
    try:
        lo, hi = (int(x) for x in args.token_range.split(":"))
    except ValueError:
        raise DatasetError(
            f"--token-range must be LO:HI integers, got {args.token_range!r}") from None
    return synthetic_requests(count, parse_length_dist(args.input_len),
                              parse_length_dist(args.output_len or DEFAULT_OUTPUT_LEN), seed,
                              (lo, hi))


def _endpoint(args) -> str:
    """HOST:PORT the bench connects to; ValueError for a URL it cannot use."""
    if args.grpc:
        host, sep, port = args.grpc.rpartition(":")
        if not host or not sep or not port.isdigit():
            raise ValueError(f"--grpc {args.grpc!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
        return args.grpc
    u = urlsplit(args.url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--url {args.url!r}: expected http://HOST[:PORT] or https://...")
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"--url {args.url!r}: the port is not a number in 0-65535") from None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{host}:{port}"


def cmd_bench(args) -> int:
    from splitserve.cluster.bench import report
    from splitserve.cluster.bench.arrivals import ArrivalSpec
    from splitserve.cluster.bench.record import write_json
    from splitserve.cluster.bench.runner import GrpcTarget, HttpTarget
    from splitserve.cluster.bench.sweep import parse_counts, parse_rates, run_sweep

    try:
        rates = parse_rates(args.rates) if args.rates else [
            math.inf if args.rate is None else args.rate]
        counts = parse_counts(args.num_requests, len(rates))
        _requests(args, 0, counts[0])  # bad lengths or an unusable file fail before any request
        base = ArrivalSpec(math.inf, args.burstiness, args.concurrency, args.seed)
        for r in rates:  # a bad rate fails here, before any request
            ArrivalSpec(r, args.burstiness, args.concurrency, args.seed)
        for flag, path in (("--out", args.out), ("--plot", args.plot)):
            problem = output_problem(flag, path, folder=False)
            if problem:
                raise ValueError(problem)
        endpoint = _endpoint(args)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # one clear line, not a failure per request, when nothing listens there
        check_reachable(endpoint)
    except ConnectionError as e:
        where = f"--grpc {args.grpc}" if args.grpc else f"--url {args.url}"
        print(f"error: {where}: {e}", file=sys.stderr)
        return 1
    target = (GrpcTarget(args.grpc, args.model, args.api_key, args.timeout) if args.grpc
              else HttpTarget(args.url, args.model, args.api_key, args.timeout))
    points = asyncio.run(run_sweep(target, lambda i: _requests(args, i, counts[i]), rates, base,
                                   args.ttft_slo, args.tpot_slo, progress=not args.no_progress,
                                   request_timeout_s=args.timeout))
    print(report.sweep_table(points))
    errors = {e: n for p in points for e, n in p.stats.errors.items()}
    for e, n in errors.items():
        print(f"  {n} x {e}", file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    config["target"] = target.description
    try:
        with interrupts_deferred():  # the files whole, even when Ctrl-C comes now
            if args.out:
                write_json(args.out, report.record({"bench": points}, config))
                print(f"wrote {args.out}", file=sys.stderr)
            if args.plot:
                Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
                report.plot({args.model: points}, args.plot, title=target.description)
                print(f"wrote {args.plot}", file=sys.stderr)
    except OSError as e:
        print(f"error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0 if all(p.stats.completed for p in points) else 1
