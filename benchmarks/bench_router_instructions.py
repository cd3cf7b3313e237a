"""RouterCore's instructions per placement, counted by callgrind: a measure
of the placing work that other processes on a shared machine do not move.

    .venv/bin/python benchmarks/bench_router_instructions.py --policy cost --requests 2000

The workload is ``bench_router.py``'s (same seed, 10k cached prefixes), but
the router runs on a fixed clock, so every run makes the same decisions.
The script runs itself under ``valgrind --tool=callgrind`` with counting
off, switches it on (``callgrind_control``) just before the loop of admit,
route, release and the stats pushes, and off after it; what remains of the
switching (a constant, measured with no requests) is subtracted. Counted
instructions miss what time also sees (cache misses: the prefix index's
lookups are mostly that), so they rank changes to the Python work, not the
whole cost; thread CPU time from ``bench_router.py`` stays the headline.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_router import PUSH_EVERY, build_workload, make_router  # noqa: E402
from splitserve.router.core import RouterCore  # noqa: E402
from splitserve.router.types import NoCapacityError, RouteRequest  # noqa: E402

T0 = 1_000_000.0
STEP_S = 5e-5  # clock advance per request: 20k requests/s


def _callgrind(on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                   capture_output=True, check=False)


def child(args) -> None:
    """Inside valgrind: build, then count only the loop."""
    w = build_workload(args.seed, args.requests, args.prefixes, per_pool=args.per_pool)
    clock = [T0]
    cfg = make_router(args.policy, dataclasses.replace(w, replicas=[], cached=[])).cfg
    router = RouterCore(cfg, clock=lambda: clock[0])
    for stats in w.replicas:
        router.update_stats(dataclasses.replace(stats, updated_at=T0))
    for rid, hashes in w.cached:
        router.on_blocks_stored(rid, hashes)
    items = [(model, RouteRequest(f"r{i}", model, len(tokens), max_tokens, block_hashes=hashes))
             for i, (model, tokens, hashes, max_tokens) in enumerate(w.requests)]
    pushes = {i: dataclasses.replace(w.replicas[(i // PUSH_EVERY) % len(w.replicas)],
                                     updated_at=T0 + i * STEP_S)
              for i in range(0, len(items), PUSH_EVERY)}
    gc.collect()
    _callgrind(True)
    for i, (model, req) in enumerate(items):
        clock[0] += STEP_S
        router.admit(model)
        try:
            router.route(req)
        except NoCapacityError:
            pass
        router.release(model)
        push = pushes.get(i)
        if push is not None:
            router.update_stats(push)
    _callgrind(False)
    c = router.counters()
    print(f"decisions {c.decisions} no_capacity {c.no_capacity} "
          f"by_reason {dict(sorted(c.by_reason.items()))}")


def counted(args, requests: int) -> tuple[int, str]:
    """Instructions collected by a child run of ``requests``, and its summary line."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={tmp}/callgrind.out", sys.executable, os.path.abspath(__file__),
               "--child", "--policy", args.policy, "--requests", str(requests),
               "--prefixes", str(args.prefixes), "--per-pool", str(args.per_pool),
               "--seed", str(args.seed)]
        env = dict(os.environ, PYTHONHASHSEED="0")  # the same set and dict orders every run
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise SystemExit(f"callgrind reported no count:\n{out.stderr[-2000:]}")
    summary = next((line for line in out.stdout.splitlines() if line.startswith("decisions")), "")
    return int(found.group(1)), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="cost")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--prefixes", type=int, default=10000)
    ap.add_argument("--per-pool", type=int, default=64, help="replicas per pool (2 models x 2 pools)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install valgrind to count instructions")
    base, _ = counted(args, 0)
    total, summary = counted(args, args.requests)
    print(f"{args.policy}: {(total - base) / args.requests:,.0f} instructions per placement "
          f"({args.requests} requests, {args.per_pool} replicas per pool; {summary})")


if __name__ == "__main__":
    main()
