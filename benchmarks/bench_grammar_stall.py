"""How long constrained requests stall everyone else's tokens: the longest
inter-token gap of running unconstrained streams while requests with a
large JSON schema arrive, with the schema's matcher built on the async
engine's compile threads (the default) or on the engine thread (that step
disabled), alternating in one run.

    .venv/bin/python -m benchmarks.bench_grammar_stall --out bench-results/grammar-stall.json

The default model, ``--streams`` greedy streams decoding without end; once
they run, ``--arrivals`` constrained requests (a schema of ``--fields``
nested objects, a few tokens each) arrive ``--spacing-s`` apart. Reported
per mode: the running streams' longest and p99 inter-token gap while the
arrivals are admitted, next to the same streams' p50 gap (the step time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from splitserve.cluster.bench.record import write_record
from splitserve.cluster.bench.report import table
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.default_model import default_model_path
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams


def big_schema(fields: int) -> str:
    props = {f"field_{i}": {"type": "object", "required": [f"x{j}" for j in range(5)],
                            "properties": {f"x{j}": {"type": ["string", "number", "null"]}
                                           for j in range(10)}} for i in range(fields)}
    return json.dumps({"type": "object", "properties": props, "required": list(props)[: fields // 2]})


async def one_pass(a: AsyncEngine, args, schema: str, off_thread: bool) -> dict:
    if not off_thread:  # the matcher is then built by add_request, on the engine thread
        async def in_engine(prompt_token_ids, params):
            return None
        a.build_matcher = in_engine
    stamps: list[list[float]] = [[] for _ in range(args.streams)]
    free = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)  # to the context end
    stop = asyncio.Event()

    async def stream(i: int) -> None:
        gen = a.generate(f"s{i}-{off_thread}", [5 + i, 6, 7, 8], free)
        async for _ in gen:
            stamps[i].append(time.perf_counter())
            if stop.is_set():
                break
        await gen.aclose()

    async def constrained(k: int) -> None:
        sp = SamplingParams(max_tokens=4, temperature=0.0,
                            structured_output={"type": "json", "value": schema})
        async for _ in a.generate(f"c{k}-{off_thread}", [9, 10, 11], sp):
            pass

    tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    await asyncio.sleep(args.warmup_s)
    t0 = time.perf_counter()
    arrivals = []
    for k in range(args.arrivals):
        arrivals.append(asyncio.create_task(constrained(k)))
        await asyncio.sleep(args.spacing_s)
    await asyncio.gather(*arrivals)
    t1 = time.perf_counter()
    stop.set()
    await asyncio.gather(*tasks)
    if not off_thread:
        del a.build_matcher
    during = [b - x for s in stamps for x, b in zip(s, s[1:]) if t0 <= b <= t1]
    before = [b - x for s in stamps for x, b in zip(s, s[1:]) if b < t0]
    during.sort()
    return {"max_gap_ms": 1e3 * during[-1], "p99_gap_ms": 1e3 * during[int(0.99 * (len(during) - 1))],
            "p50_gap_before_ms": 1e3 * statistics.median(before), "gaps": len(during)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--arrivals", type=int, default=6)
    ap.add_argument("--spacing-s", type=float, default=0.25)
    ap.add_argument("--warmup-s", type=float, default=1.0)
    ap.add_argument("--fields", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3, help="passes per mode, alternating; best kept")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = default_model_path()
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=2048, block_size=16,
                                 max_num_seqs=args.streams + args.arrivals))
    schema = big_schema(args.fields)
    a = AsyncEngine(eng).start()
    best: dict[bool, dict] = {}
    try:
        for _ in range(args.reps):
            for off in (True, False):
                r = asyncio.run(one_pass(a, args, schema, off))
                if off not in best or r["max_gap_ms"] < best[off]["max_gap_ms"]:
                    best[off] = r
    finally:
        a.stop()
    rows = [[label, best[off]["p50_gap_before_ms"], best[off]["p99_gap_ms"], best[off]["max_gap_ms"]]
            for label, off in (("compile threads", True), ("engine thread", False))]
    print(f"{args.streams} running streams, {args.arrivals} arrivals of a {args.fields}-object "
          f"JSON schema {args.spacing_s} s apart (best of {args.reps} passes per mode)")
    print(table(rows, ["matcher built on", "step p50 ms", "gap p99 ms", "gap max ms"]))
    ratio = best[False]["max_gap_ms"] / best[True]["max_gap_ms"]
    print(f"longest stall, engine thread / compile threads: {ratio:.2f}x")
    write_record(args.out, "grammar_stall", {"compile_threads": best[True],
                                            "engine_thread": best[False],
                                            "max_gap_ratio": ratio, "args": vars(args)})


if __name__ == "__main__":
    main()
