"""Where a replica's memory goes under load: heap profiles taken inside the
live decode replicas of the fault report's cluster (docs/benchmarks.md,
"Faults under load and soak").

    .venv/bin/python benchmarks/replica_heap.py --rate 40 --duration 200 --start 30 --end 180

The same cluster and Poisson load as ``fault_report.py --no-faults``
(outputs are not checked here). At ``--start`` s each decode replica starts
``tracemalloc`` (through the Serve replica actor); every 20 s until
``--end`` the run prints each replica's resident memory and glibc's in-use
heap (``mallinfo2``); at ``--end`` each replica prints the Python
allocations that grew most since ``--start``, with their tracebacks.
Resident memory growing while the in-use heap and the Python allocations
stay flat is the allocator keeping freed pages, not state kept per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import fault_report as report  # noqa: E402


def _mallinfo_in_use_mib() -> float:
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20


# run inside a replica actor through __ray_call__ (first argument: the actor instance)
def _start_tracing(replica) -> int:
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start(10)
    replica._heap_baseline = tracemalloc.take_snapshot()
    return os.getpid()


def _in_use(replica) -> float:
    return _mallinfo_in_use_mib()


def _growth(replica, top: int) -> str:
    import gc
    import tracemalloc

    gc.collect()
    stats = tracemalloc.take_snapshot().compare_to(replica._heap_baseline, "traceback")
    lines = [f"pid {os.getpid()}: Python allocations grew {sum(s.size_diff for s in stats) / 2**20:.2f}"
             f" MiB in all; glibc in use {_mallinfo_in_use_mib():.1f} MiB"]
    for s in stats[:top]:
        lines.append(f"  {s.size_diff / 1024:+.0f} KiB in {s.count_diff:+d} blocks at")
        lines += ["    " + ln for ln in s.traceback.format()[-6:]]
    tracemalloc.stop()
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=40.0)
    ap.add_argument("--duration", type=float, default=200.0)
    ap.add_argument("--start", type=float, default=30.0, help="s into the load: start tracing")
    ap.add_argument("--end", type=float, default=180.0, help="s into the load: report growth")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--num-cpus", type=int, default=4)
    args = ap.parse_args()
    if not 0 <= args.start < args.end <= args.duration:
        ap.error("need 0 <= --start < --end <= --duration")

    import ray

    from splitserve.cluster.serve import app
    from splitserve.engine.default_model import default_model_path
    from splitserve.engine.loader import load_checkpoint

    path = str(default_model_path())
    vocab = load_checkpoint(path).model_config.vocab_size
    reqs = report.make_requests(int(args.rate * args.duration * 1.2) + 20, vocab, 0, (16, 64))
    cfg = report.cluster_config(path, 16)
    try:
        report.start_cluster(cfg, args.num_cpus)
        replicas = [ray.get_actor(a["name"], namespace="serve")
                    for a in report.replica_actors("decode")]

        async def probe() -> None:
            await asyncio.sleep(args.start)
            for h in replicas:
                await h.__ray_call__.remote(_start_tracing)
            t = args.start
            while t + 20 <= args.end:
                await asyncio.sleep(20)
                t += 20
                rss = [round(u["rss_mib"]) for u in report.process_usage().values()
                       if u["role"] == "decode"]
                heap = [round(await h.__ray_call__.remote(_in_use), 1) for h in replicas]
                print(f"t {t:.0f} s: decode resident MiB {rss}, glibc in use MiB {heap}", flush=True)
            for h in replicas:
                print(await h.__ray_call__.remote(_growth, args.top), flush=True)

        async def both() -> None:
            await asyncio.gather(report.run(cfg, reqs, [[] for _ in reqs], args.rate,
                                            args.duration, 0, False), probe())

        asyncio.run(both())
    finally:
        app.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
