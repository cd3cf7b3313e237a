"""The simulator against a real local cluster: same config, same requests,
this machine's measured profile; TTFT and TPOT p50/p90 side by side.

For each layout (the config as given, disaggregated, and its colocated
variant) it starts the cluster (``splitserve serve``), runs ``splitserve
bench`` at each rate, stops the cluster, then replays exactly the requests
the bench sent (send times and lengths from its JSON record) in
``splitserve simulate``'s engine on the ``local`` hardware profile. The
profile must exist (``splitserve profile --config CONFIG --db DB``; the
script runs it when the database has none).

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

from splitserve.cluster.bench.live import run_cli, serve_and_bench  # noqa: E402
from splitserve.cluster.bench.record import record_header, write_json  # noqa: E402
from splitserve.cluster.config import load_config  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.hardware import local_cpu_key  # noqa: E402
from splitserve.cluster.planning.sim.replay import replay_bench_run  # noqa: E402
METRICS = (("ttft", "p50"), ("ttft", "p90"), ("tpot", "p50"), ("tpot", "p90"))


def layouts(config: str, out: Path) -> dict[str, Path]:
    data = yaml.safe_load(Path(config).read_text())
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


def ensure_profile(config: str, db: ProfileDB, db_path: str) -> None:
    threads = max(1, int(load_config(config).models[0].decode.num_cpus))
    key = local_cpu_key(threads)
    if any(p["hardware_key"] == key for p in db.profiled()):
        return
    print(f"no measured profile for {key}: profiling", file=sys.stderr)
    run_cli(["profile", "--config", config, "--db", db_path, "--handoff"])


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
    ap.add_argument("--reuse", default=None, metavar="DIR",
                    help="simulate against the bench records already in DIR")
    args = ap.parse_args()
    out = Path(args.reuse or args.out)
    out.mkdir(parents=True, exist_ok=True)
    db_path = args.db or str(out / "profiles.db")
    db = ProfileDB(db_path)
    ensure_profile(args.config, db, db_path)
    rows = []
    for layout, cfg_path in layouts(args.config, out).items():
        record = out / f"bench-{cfg_path.stem}.json"
        if not args.reuse:
            serve_and_bench(cfg_path, record, args.rates, args.num_requests, args.input_len,
                            args.output_len, args.seed)
        for run in json.loads(record.read_text())["runs"]:
            sim = replay_bench_run(cfg_path, run, db, args.seed)
            rows.append({"layout": layout, "rate": run["rate"],
                         "compare": compare(run["stats"], sim)})
    text = table(rows)
    print(text)
    errs = [abs(c["error"]) for r in rows for c in r["compare"].values() if c["error"] is not None]
    within = sum(e <= 0.15 for e in errs)
    print(f"{within}/{len(errs)} figures within 15%; worst {max(errs):.0%}" if errs else "no data")
    (out / "comparison.md").write_text(text + "\n")
    write_json(out / "comparison.json", {**record_header("sim-validate"), "args": vars(args),
                                         "rows": rows})
    plot(rows, out / "comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
