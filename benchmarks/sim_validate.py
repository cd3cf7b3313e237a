"""The simulator against a real local cluster: same config, same requests,
this machine's measured profile; TTFT and TPOT p50/p90 side by side.

For each layout (the config as given, disaggregated, and its colocated
variant) it starts the cluster (``splitserve serve``), runs ``splitserve
bench`` at each rate, stops the cluster, then replays exactly the requests
the bench sent (send times and lengths from its JSON record) in
``splitserve simulate``'s engine on the ``local`` hardware profile, twice:
with the engine's step times only, and with the serving path's overhead
that ``splitserve profile --serving-url`` measured on that cluster just
before the bench (closed loops at concurrency 1 and 4: a calibration at
no load, checked here under load). The step profile must exist
(``splitserve profile --config CONFIG --db DB``; the script runs it when
the database has none).

    python benchmarks/sim_validate.py --config deploy/configs/local.yaml \\
        --rates 1,2,4 --num-requests 60 --out bench-results/sim-validate
    python benchmarks/sim_validate.py --reuse bench-results/sim-validate   # simulate only

The target (issue 17): within 15% at three load levels, for both layouts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitserve.cluster.bench.live import free_port, run_cli, serve_and_bench  # noqa: E402
from splitserve.cluster.bench.record import record_header, write_json  # noqa: E402
from splitserve.cluster.config import load_config  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.hardware import local_cpu_key  # noqa: E402
from splitserve.cluster.planning.sim.replay import replay_bench_run  # noqa: E402
METRICS = (("ttft", "p50"), ("ttft", "p90"), ("tpot", "p50"), ("tpot", "p90"))


def layouts(config: str, out: Path) -> dict[str, Path]:
    """The config as given and its other layout, written to ``out``, each on
    free ports (other clusters may share the machine)."""
    data = yaml.safe_load(Path(config).read_text())
    data["endpoints"] = {**data.get("endpoints", {}), "http_port": free_port(),
                         "grpc_port": free_port()}
    other = json.loads(json.dumps(data))
    for m in other["models"]:
        m["mode"] = "colocated" if m.get("mode", "disaggregated") == "disaggregated" else "disaggregated"
    paths = {}
    for d in (data, other):
        mode = d["models"][0].get("mode", "disaggregated")
        p = out / f"{mode}.yaml"
        p.write_text(yaml.safe_dump(d))
        paths[mode] = p
    return paths


def ensure_profile(config: str, db: ProfileDB, db_path: str, extra: list[str],
                   again: bool) -> None:
    threads = max(1, int(load_config(config).models[0].decode.num_cpus))
    key = local_cpu_key(threads)
    if not again and any(p["hardware_key"] == key for p in db.profiled()):
        return
    print(f"profiling {key}", file=sys.stderr)
    run_cli(["profile", "--config", config, "--db", db_path, "--handoff"] + extra)


def compare(real: dict, sim: dict) -> dict:
    row = {}
    for metric, q in METRICS:
        r, s = real[metric][q], sim[metric][q]
        row[f"{metric}_{q}"] = {"real": r, "sim": s,
                               "error": None if not r or r != r or s != s else s / r - 1}
    return row


def table(rows: list[dict]) -> str:
    head = "| layout | rate | " + " | ".join(f"{m} {q} real / sim (err)" for m, q in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for r in rows:
        cells = []
        for m, q in METRICS:
            c = r["compare"][f"{m}_{q}"]
            err = "n/a" if c["error"] is None else f"{c['error']:+.0%}"
            cells.append(f"{c['real'] * 1e3:.0f} / {c['sim'] * 1e3:.0f} ms ({err})")
        lines.append(f"| {r['layout']} | {r['rate']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(16, 4))
    for ax, (m, q) in zip(axes, METRICS):
        for layout, marker in (("disaggregated", "o"), ("colocated", "s")):
            rs = [r for r in rows if r["layout"] == layout]
            x = [r["rate"] for r in rs]
            ax.plot(x, [r["compare"][f"{m}_{q}"]["real"] * 1e3 for r in rs], marker=marker,
                    label=f"{layout} real")
            ax.plot(x, [r["compare"][f"{m}_{q}"]["sim"] * 1e3 for r in rs], marker=marker,
                    linestyle="--", label=f"{layout} sim")
        ax.set_title(f"{m.upper()} {q}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/configs/local.yaml")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--input-len", default="uniform:64:256")
    ap.add_argument("--output-len", default="64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--db", default=None, help="profile database (default: OUT/profiles.db)")
    ap.add_argument("--out", default="bench-results/sim-validate")
    ap.add_argument("--profile-args", default="",
                    help="extra arguments of `splitserve profile`, e.g. --fast")
    ap.add_argument("--reprofile", action="store_true",
                    help="profile again even when the database has this machine's rows (the "
                         "profile should be measured in the conditions of the runs)")
    ap.add_argument("--no-serving-probe", action="store_true",
                    help="do not measure the serving path's overhead on each cluster")
    ap.add_argument("--reuse", default=None, metavar="DIR",
                    help="simulate against the bench records already in DIR")
    args = ap.parse_args()
    out = Path(args.reuse or args.out)
    out.mkdir(parents=True, exist_ok=True)
    db_path = args.db or str(out / "profiles.db")
    db = ProfileDB(db_path)
    if not args.reuse:
        ensure_profile(args.config, db, db_path, args.profile_args.split(), args.reprofile)
    rows = []
    for layout, cfg_path in layouts(args.config, out).items():
        record = out / f"bench-{cfg_path.stem}.json"
        if not args.reuse:
            probe = None if args.no_serving_probe else (
                lambda url, c=cfg_path: run_cli(["profile", "--config", str(c), "--db", db_path,
                                                 "--serving-url", url]))
            serve_and_bench(cfg_path, record, args.rates, args.num_requests, args.input_len,
                            args.output_len, args.seed, before_bench=probe)
        for run in json.loads(record.read_text())["runs"]:
            for overhead in (False, True):
                sim = replay_bench_run(cfg_path, run, db, args.seed, serving_overhead=overhead)
                rows.append({"layout": layout, "rate": run["rate"], "serving_overhead": overhead,
                             "compare": compare(run["stats"], sim)})
    texts = []
    for overhead, title in ((False, "engine step times only"),
                            (True, "with the serving path's measured overhead")):
        sel = [r for r in rows if r["serving_overhead"] is overhead]
        errs = [abs(c["error"]) for r in sel for c in r["compare"].values()
                if c["error"] is not None]
        summary = (f"{sum(e <= 0.15 for e in errs)}/{len(errs)} figures within 15%; worst "
                   f"{max(errs):.0%}, median {sorted(errs)[len(errs) // 2]:.0%}"
                   if errs else "no data")
        texts.append(f"simulated with {title}:\n\n{table(sel)}\n\n{summary}")
    text = "\n\n".join(texts)
    print(text)
    (out / "comparison.md").write_text(text + "\n")
    write_json(out / "comparison.json", {**record_header("sim-validate"), "args": vars(args),
                                         "rows": rows})
    plot([r for r in rows if r["serving_overhead"]], out / "comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
