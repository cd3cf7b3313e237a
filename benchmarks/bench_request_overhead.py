"""Where one request's time to first token goes beyond the engine, stage by
stage, on a live local cluster (disaggregated: one prefill and one decode
replica of the embedded default model, one router, one ingress).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_request_overhead.py \\
        --out bench-results/request-overhead.json

``--compare BEFORE.json,... AFTER.json,...`` prints two trees' runs side by
side (ranges, ratio of medians). ``--checkout DIR`` serves another source tree (e.g. the main branch's) with
this same script, so two trees compare under one method. Requests are sent
one at a time from this process over HTTP (``/v1/completions``, streamed, a
text prompt of ``--prompt-tokens`` tokens, ``--max-tokens`` tokens out,
``ignore_eos``): ``--requests`` untraced ones first (the TTFT and ITL
figures), then as many traced ones (a sampled ``traceparent``: the cluster's
tracing exports every process's spans over OTLP to a collector in this
process; ``sample_ratio`` 0 keeps the untraced requests unrecorded). From
each traced request's spans (one clock: one machine):

  to_ingress       client send -> ``ingress`` span start (Serve's proxy, HTTP)
  ingress_prepare  -> ``route`` start (body, tokenize, validate, prefix hashes); of it
                   ``body_read``: to the ingress span's ``body_read`` event (the body
                   fetched from Serve's proxy, one more round trip)
  placement        ``route`` span (the router round trip; ``router.place`` inside)
  to_decode        ``route`` end -> ``decode`` start (the Generate RPC)
  decode_admit     -> ``handoff.receive`` start (validation on the engine thread)
  to_prefill       -> ``prefill`` start (KV reservation: ``reserve``; the Prefill RPC)
  prefill          ``prefill`` span: to its ``first_token`` (``prefill_engine``: queue and
                   step), the KV sent (``handoff_send``, first chunk to last ack), then
                   ``prefill_tail`` (the reply's metadata, the blocks released)
  prefill_reply    ``prefill`` end -> ``handoff.receive`` end
  decode_first     -> the ``first_token`` event (commit, admission, first output)
  to_ingress_out   -> the ingress's first output (its ``ingress_ttft_s`` timing)
  to_client        -> the first streamed chunk at the client

and the per-token path: the client's inter-token gaps against one decode
step of one sequence, timed on the same engine in this process
(``LLMEngine.step()`` alone, one torch thread like the replica).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = "default"
KEY = "sk-request-overhead"
STAGES = ("to_ingress", "ingress_prepare", "body_read", "placement", "router_place", "to_decode",
          "decode_admit", "to_prefill", "reserve", "prefill", "prefill_engine", "handoff_send",
          "prefill_tail", "prefill_reply", "decode_first", "to_ingress_out", "to_client")
# parts of the stage before them; the others tile the client's TTFT
INSIDE = ("body_read", "router_place", "reserve", "prefill_engine", "handoff_send", "prefill_tail")
TILING = tuple(s for s in STAGES if s not in INSIDE)


def _checkout(argv: list[str]) -> str:
    """The source tree to serve: ``--checkout DIR``, else this script's."""
    for i, a in enumerate(argv):
        if a == "--checkout" and i + 1 < len(argv):
            return os.path.abspath(argv[i + 1])
        if a.startswith("--checkout="):
            return os.path.abspath(a.split("=", 1)[1])
    return ROOT


CHECKOUT = _checkout(sys.argv)
sys.path.insert(0, CHECKOUT)
if CHECKOUT != ROOT:
    sys.path.insert(1, ROOT)  # this tree's test fixtures (the collector)


def config(path: str, http_port: int, grpc_port: int, collector: str):
    from splitserve.cluster.config import parse_config

    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    return parse_config({
        "models": [{"model": {"name": MODEL, "path": path, "num_blocks": 512,
                              "max_num_seqs": 16},
                    "mode": "disaggregated", "prefill": pool, "decode": pool}],
        # every prompt goes to the prefill pool: the hand-off is part of the path
        "router": {"routers": 1, "local_prefill_max_tokens": 0},
        "auth": {"api_keys": [KEY], "cluster_token": "request-overhead"},
        "endpoints": {"http_port": http_port, "grpc_port": grpc_port},
        "observability": {"tracing": {"endpoint": collector, "schedule_delay_ms": 50,
                                      "sample_ratio": 0.0, "service_name": "overhead"}},
    })


def prompt_of(tokenizer, n: int) -> str:
    """A held-out text prefix that the completions API encodes to ``n`` tokens."""
    from splitserve.engine.default_model import HELDOUT_PATH

    words = HELDOUT_PATH.read_text().split()
    for k in range(1, len(words)):
        text = " ".join(words[:k])
        got = len(tokenizer.encode(text))
        if got == n:
            return text
        if got > n:
            break
    raise ValueError(f"no held-out prefix encodes to {n} tokens")


def one_request(http, url: str, prompt: str, max_tokens: int,
                traceparent: str | None) -> dict:
    """One streamed completion: wall-clock send time (ns), the arrival time of
    every chunk that carried tokens (ns), the ingress's timings."""
    headers = {"Authorization": f"Bearer {KEY}", "x-splitserve-timings": "1"}
    if traceparent:
        headers["traceparent"] = traceparent
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks, timings, usage = [], None, None
    sent = time.time_ns()
    with http.stream("POST", url, json=body, headers=headers) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.time_ns()
            d = json.loads(line[6:])
            timings = timings or d.get("splitserve_timings")
            usage = d.get("usage") or usage
            if d.get("choices"):
                chunks.append(now)
    return {"sent_ns": sent, "chunks_ns": chunks, "timings": timings, "usage": usage}


def concurrent(url: str, prompt: str, max_tokens: int, n: int, clients: int) -> list[dict]:
    """``n`` requests from ``clients`` clients, each sending back to back."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    def client(k: int) -> list[dict]:
        with httpx.Client(timeout=60) as http:
            return [one_request(http, url, prompt, max_tokens, None)
                    for _ in range(k, n, clients)]

    with ThreadPoolExecutor(clients) as ex:
        return [r for rs in ex.map(client, range(clients)) for r in rs]


def one_grpc_request(stub, prompt: str, max_tokens: int) -> dict:
    """The same request over the gRPC API (the ingress replica's own server:
    no Serve proxy on the way)."""
    from splitserve.cluster.api.proto import splitserve_pb2 as pb

    req = pb.GenerateRequest(model=MODEL, text=prompt, params=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    chunks, tokens = [], 0
    sent = time.time_ns()
    for r in stub.Generate(req, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60):
        if r.token_ids:
            chunks.append(time.time_ns())
            tokens += len(r.token_ids)
    return {"sent_ns": sent, "chunks_ns": chunks, "tokens": tokens}


def breakdown(req: dict, spans: dict) -> dict[str, float]:
    """Stage -> ms for one traced request (``spans``: name -> Received)."""
    ing, route, place = spans["ingress"], spans["route"], spans["router.place"]
    dec, recv, pre, send = (spans["decode"], spans["handoff.receive"], spans["prefill"],
                            spans["handoff.send"])
    first = dec.event_ns["first_token"]
    ingress_out = ing.start_ns + int(req["timings"]["ingress_ttft_s"] * 1e9)
    ms = lambda a, b: (b - a) / 1e6  # noqa: E731
    return {
        "to_ingress": ms(req["sent_ns"], ing.start_ns),
        "ingress_prepare": ms(ing.start_ns, route.start_ns),
        # a tree without the event: none
        "body_read": ms(ing.start_ns, ing.event_ns["body_read"]) if "body_read" in ing.event_ns
        else None,
        "placement": ms(route.start_ns, route.end_ns),
        "router_place": ms(place.start_ns, place.end_ns),
        "to_decode": ms(route.end_ns, dec.start_ns),
        "decode_admit": ms(dec.start_ns, recv.start_ns),
        "to_prefill": ms(recv.start_ns, pre.start_ns),
        "reserve": ms(recv.start_ns, recv.event_ns["reserved"]),
        "prefill": ms(pre.start_ns, pre.end_ns),
        "prefill_engine": ms(pre.start_ns, pre.event_ns["first_token"]),
        "handoff_send": ms(send.start_ns, send.end_ns),
        "prefill_tail": ms(send.end_ns, pre.end_ns),
        "prefill_reply": ms(pre.end_ns, recv.end_ns),
        "decode_first": ms(recv.end_ns, first),
        "to_ingress_out": ms(first, ingress_out),
        "to_client": ms(ingress_out, req["chunks_ns"][0]),
    }


def engine_step_ms(spec, prompt_ids: list[int], max_tokens: int, reps: int) -> dict:
    """One sequence's prefill and decode steps on this process's engine, ms."""
    import torch

    from splitserve.cluster.serve.checkpoints import checkpoint_dir
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)  # as a replica given one CPU or less
    eng = LLMEngine(EngineConfig(
        model=str(checkpoint_dir(spec)), model_id=spec.name, device="cpu",
        block_size=spec.block_size, num_blocks=spec.num_blocks, max_num_seqs=spec.max_num_seqs,
        enable_prefix_caching=False))
    prefill, decode = [], []
    for r in range(reps + 1):  # the first pass warms up
        eng.add_request(f"s{r}", prompt_token_ids=list(prompt_ids),
                        params=SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                              ignore_eos=True))
        k = 0
        while eng.has_unfinished():
            t0 = time.perf_counter()
            eng.step()
            dt = 1000 * (time.perf_counter() - t0)
            if r:
                (prefill if k == 0 else decode).append(dt)
            k += 1
    return {"prefill_ms": statistics.median(prefill), "decode_ms": statistics.median(decode)}


def actor_pids() -> dict[str, int]:
    """The cluster's processes on the path: ingress, Serve's proxy, router,
    prefill and decode replicas."""
    import ray

    want = {"ingress": "SERVE_REPLICA::ingress#", "proxy": "SERVE_PROXY_ACTOR",
            "router": "splitserve-router", "prefill": f"SERVE_REPLICA::{MODEL}-prefill#",
            "decode": f"SERVE_REPLICA::{MODEL}-decode#"}
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        for role, prefix in want.items():
            if role not in out and a["name"].startswith(prefix):
                h = ray.get_actor(a["name"], namespace=a["namespace"])
                out[role] = ray.get(h.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
    return out


def start_profilers(folder: str, seconds: float) -> list:
    """``py-spy record`` (a measuring tool, installed apart) on each process of
    the path for ``seconds``: one flame-graph SVG and one raw stack file per role."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    os.makedirs(folder, exist_ok=True)
    procs = []
    for role, pid in actor_pids().items():
        procs.append(subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", "250", "--duration", str(int(seconds)),
             "--format", "raw", "--output", os.path.join(folder, f"{role}.txt"), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def revision(tree: str) -> str | None:
    """The git revision of ``tree``; None for an exported tree (no .git)."""
    import subprocess

    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def median_or_none(vals: list[float | None]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def mean_or_none(vals: list[float | None]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def pct(vals: list[float], q: float) -> float:
    s = sorted(vals)
    return s[min(len(s) - 1, int(q * len(s)))]


def compare(before: list[str], after: list[str], out: str | None) -> int:
    """Ranges over the runs of two trees (records of this script) and the
    ratio of their medians (after / before), per figure and stage."""
    from splitserve.cluster.bench.record import write_json

    def load(paths):
        return [json.load(open(p)) for p in paths]

    a, b = load(before), load(after)
    figures = {"TTFT p50": lambda r: r["summary"]["ttft_ms"]["p50"],
               "TTFT p90": lambda r: r["summary"]["ttft_ms"]["p90"],
               "ITL p50": lambda r: r["summary"]["itl_ms"]["p50"],
               "e2e p50": lambda r: r["summary"]["e2e_ms"]["p50"],
               "gRPC TTFT p50": lambda r: r["summary"]["grpc_ttft_ms"]["p50"],
               "traced TTFT p50": lambda r: r["summary"]["ttft_traced_ms"]["p50"]}
    for k in STAGES:
        figures[f"stage {k} p50"] = lambda r, k=k: r["summary"]["stages_p50_ms"].get(k)
    rows = {}
    print(f"{'figure, ms':<28} {'before (range)':>17} {'after (range)':>17} {'after/before':>12}")
    for name, get in figures.items():
        va = [v for v in map(get, a) if v is not None]
        vb = [v for v in map(get, b) if v is not None]
        if not va or not vb:
            continue
        ratio = statistics.median(vb) / statistics.median(va)
        rows[name] = {"before": va, "after": vb, "ratio_of_medians": ratio}
        print(f"{name:<28} {min(va):7.2f}-{max(va):7.2f}  {min(vb):7.2f}-{max(vb):7.2f} "
              f"{ratio:12.2f}")
    loads = [x for r in a + b for x in (r["load_average"]["before"][0],
                                        r["load_average"]["after"][0])]
    print(f"load average (1 min) over the runs: {min(loads):.1f}-{max(loads):.1f}")
    if out:
        write_json(out, {"before": before, "after": after, "figures": rows,
                         "load_average_1m": [min(loads), max(loads)]})
        print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", default=ROOT, help="the source tree the cluster serves")
    ap.add_argument("--requests", type=int, default=50, help="untraced, then as many traced")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=1,
                    help="clients of the untraced HTTP requests (the traced ones: one)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs given to Ray")
    ap.add_argument("--profile", default=None,
                    help="folder: py-spy each process of the path during the untraced requests")
    ap.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable of every Ray process (e.g. a Ray Serve "
                         "setting); repeatable")
    ap.add_argument("--label", default=None, help="names this run in the record")
    ap.add_argument("--out", default=None, help="JSON record (bench-results/...)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                    help="no run: compare two comma-separated lists of this script's records")
    args = ap.parse_args()
    if args.compare:
        return compare(args.compare[0].split(","), args.compare[1].split(","), args.out)

    import httpx
    import ray

    from splitserve.cluster.bench.live import free_port
    from splitserve.cluster.bench.record import write_json
    from splitserve.cluster.serve import app
    from splitserve.cluster.serve.router_names import NAMESPACE
    from splitserve.engine.default_model import default_model_path
    from splitserve.engine.tokenizer import Tokenizer
    from tests.fixtures.otlp_collector import Collector

    path = str(default_model_path())
    tok = Tokenizer.from_dir(path)
    prompt = prompt_of(tok, args.prompt_tokens)
    http_port, grpc_port = free_port(), free_port()
    collector = Collector()
    cfg = config(path, http_port, grpc_port, collector.endpoint)
    step = engine_step_ms(cfg.models[0].model, tok.encode(prompt), args.max_tokens, reps=10)
    load_before = os.getloadavg()
    if args.out:
        args.out = os.path.abspath(args.out)
    # Ray's workers put the driver's working directory first on their path: the
    # checkout served must be the one they import
    os.chdir(CHECKOUT)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    collector.start()
    ray.init(num_cpus=args.num_cpus, namespace=NAMESPACE, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": CHECKOUT,
                                       "SPLITSERVE_BIND_HOST": "127.0.0.1",
                                       **dict(e.split("=", 1) for e in args.serve_env)}})
    url = f"http://127.0.0.1:{http_port}/v1/completions"
    untraced, traced, over_grpc = [], [], []
    try:
        app.deploy(cfg, wait_s=300)
        with httpx.Client(timeout=60) as http:
            for _ in range(args.warmup):
                one_request(http, url, prompt, args.max_tokens, None)
            spies = [] if args.profile is None else start_profilers(args.profile, 30)
            if args.concurrency == 1:
                for _ in range(args.requests):
                    untraced.append(one_request(http, url, prompt, args.max_tokens, None))
            else:
                untraced = concurrent(url, prompt, args.max_tokens, args.requests,
                                      args.concurrency)
            for p in spies:
                p.wait()
        import grpc

        from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            for _ in range(args.warmup):
                one_grpc_request(stub, prompt, args.max_tokens)
            for _ in range(args.requests):
                over_grpc.append(one_grpc_request(stub, prompt, args.max_tokens))
        with httpx.Client(timeout=60) as http:
            for _ in range(args.requests):
                trace = uuid.uuid4().hex
                r = one_request(http, url, prompt, args.max_tokens,
                                f"00-{trace}-{uuid.uuid4().hex[:16]}-01")
                r["trace"] = trace
                traced.append(r)
        names = {"ingress", "route", "router.place", "decode", "handoff.receive", "prefill",
                 "handoff.send"}
        want = {r["trace"] for r in traced}
        spans = collector.wait_for(
            lambda ss: all(names <= {s.name for s in ss if s.trace_id == t} for t in want)
            if len({s.trace_id for s in ss} & want) == len(want) else False, timeout_s=60)
        app.shutdown()
    finally:
        ray.shutdown()
        collector.stop()
    load_after = os.getloadavg()

    for r in untraced + traced:
        assert r["usage"]["prompt_tokens"] == args.prompt_tokens, r["usage"]
        assert r["usage"]["completion_tokens"] == args.max_tokens, r["usage"]
    for r in over_grpc:
        assert r["tokens"] == args.max_tokens, r
    by_trace: dict[str, dict] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, {})[s.name] = s
    stages = [breakdown(r, by_trace[r["trace"]]) for r in traced]
    def ttft(rs):
        return [(r["chunks_ns"][0] - r["sent_ns"]) / 1e6 for r in rs]

    def itl(rs):
        return [(b - a) / 1e6 for r in rs for a, b in zip(r["chunks_ns"], r["chunks_ns"][1:])]

    def total(rs):
        return [(r["chunks_ns"][-1] - r["sent_ns"]) / 1e6 for r in rs]

    summary = {
        "ttft_ms": {"p50": statistics.median(ttft(untraced)), "p90": pct(ttft(untraced), 0.9)},
        "ttft_traced_ms": {"p50": statistics.median(ttft(traced))},
        "grpc_ttft_ms": {"p50": statistics.median(ttft(over_grpc)),
                         "p90": pct(ttft(over_grpc), 0.9)},
        "grpc_itl_ms": {"p50": statistics.median(itl(over_grpc))},
        "itl_ms": {"p50": statistics.median(itl(untraced)), "p90": pct(itl(untraced), 0.9)},
        "e2e_ms": {"p50": statistics.median(total(untraced))},
        "engine": step,
        "stages_p50_ms": {k: median_or_none([s[k] for s in stages]) for k in STAGES},
        "stages_mean_ms": {k: mean_or_none([s[k] for s in stages]) for k in STAGES},
    }
    # what the serving path adds beyond the engine: TTFT minus one prefill step,
    # ITL minus one decode step of one sequence
    summary["ttft_overhead_ms"] = summary["ttft_ms"]["p50"] - step["prefill_ms"]
    summary["itl_overhead_ms"] = summary["itl_ms"]["p50"] - step["decode_ms"]
    tiled = sum(summary["stages_mean_ms"][k] for k in TILING)
    print(f"checkout {CHECKOUT}  load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"TTFT p50 {summary['ttft_ms']['p50']:.1f} ms (p90 {summary['ttft_ms']['p90']:.1f}; "
          f"traced p50 {summary['ttft_traced_ms']['p50']:.1f}), ITL p50 "
          f"{summary['itl_ms']['p50']:.2f} ms (p90 {summary['itl_ms']['p90']:.2f}), "
          f"e2e p50 {summary['e2e_ms']['p50']:.1f} ms")
    print(f"gRPC API (no Serve proxy): TTFT p50 {summary['grpc_ttft_ms']['p50']:.1f} ms (p90 "
          f"{summary['grpc_ttft_ms']['p90']:.1f}), ITL p50 {summary['grpc_itl_ms']['p50']:.2f} ms")
    print(f"engine alone: prefill step {step['prefill_ms']:.2f} ms, decode step "
          f"{step['decode_ms']:.2f} ms -> serving overhead TTFT "
          f"{summary['ttft_overhead_ms']:.1f} ms, per token {summary['itl_overhead_ms']:.2f} ms")
    print(f"{'stage':<16} {'p50 ms':>8} {'mean ms':>8} {'share':>6}")
    for k in STAGES:
        m = summary["stages_mean_ms"][k]
        if m is None:
            continue
        share = f"{100 * m / tiled:5.1f}%" if k in TILING else "  (in)"
        print(f"{k:<16} {summary['stages_p50_ms'][k]:8.2f} {m:8.2f} {share:>6}")
    print(f"{'sum (traced)':<16} {'':>8} {tiled:8.2f}")
    if args.out:
        write_json(args.out, {
            "label": args.label, "checkout": CHECKOUT, "revision": revision(CHECKOUT),
            "command": " ".join(sys.argv), "summary": summary, "stages": stages,
            "ttft_ms": ttft(untraced), "itl_ms": itl(untraced),
            "grpc_ttft_ms": ttft(over_grpc), "grpc_itl_ms": itl(over_grpc),
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "requests": args.requests, "load_average": {"before": load_before,
                                                        "after": load_after},
            "host": platform.node(), "cpus": os.cpu_count(), "processor": platform.processor(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
