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
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitserve.cluster.config import load_config  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.hardware import local_cpu_key  # noqa: E402
from splitserve.cluster.planning.sim.cli_args import shapes_for  # noqa: E402
from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation  # noqa: E402
from splitserve.cluster.planning.workload import TraceRequest  # noqa: E402

PY = sys.executable
CLI = [PY, "-m", "splitserve.cluster.cli.main"]
METRICS = (("ttft", "p50"), ("ttft", "p90"), ("tpot", "p50"), ("tpot", "p90"))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


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


def real_run(cfg_path: Path, args, out: Path) -> Path:
    """Serve ``cfg_path`` locally and bench it; returns the bench record."""
    record = out / f"bench-{cfg_path.stem}.json"
    server = subprocess.Popen(CLI + ["serve", "--config", str(cfg_path)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + 600
        for line in server.stdout:
            sys.stderr.write(f"  [serve] {line}")
            if line.startswith("ready in"):
                break
            if time.time() > deadline:
                raise RuntimeError("the cluster did not start in 600 s")
        cfg = load_config(cfg_path)
        port = cfg.endpoints.http_port
        subprocess.run(CLI + ["bench", "--url", f"http://127.0.0.1:{port}", "--model",
                              cfg.models[0].model.name, "--rates", args.rates,
                              "--num-requests", str(args.num_requests), "--input-len",
                              args.input_len, "--output-len", args.output_len, "--seed",
                              str(args.seed), "--ttft-slo", str(cfg.slo.ttft_s), "--tpot-slo",
                              str(cfg.slo.tpot_s), "--out", str(record), "--no-progress"],
                       env=_env(), check=True, timeout=3600)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
    return record


def simulate(cfg_path: Path, run: dict, db: ProfileDB, seed: int) -> dict:
    cfg = load_config(cfg_path)
    reqs = sorted(run["requests"], key=lambda r: r["send_time"])
    t0 = reqs[0]["send_time"]
    workload = [TraceRequest(r["send_time"] - t0, r["prompt_len"], r["output_len"]) for r in reqs]
    sim = Simulation(cfg, shapes_for(cfg, []), lambda m, role: "local", db, workload,
                     SimOptions(seed=seed))
    return sim.run().record["summary"]


def ensure_profile(config: str, db: ProfileDB, db_path: str) -> None:
    threads = max(1, int(load_config(config).models[0].decode.num_cpus))
    key = local_cpu_key(threads)
    if any(p["hardware_key"] == key for p in db.profiled()):
        return
    print(f"no measured profile for {key}: profiling", file=sys.stderr)
    subprocess.run(CLI + ["profile", "--config", config, "--db", db_path, "--handoff"],
                   env=_env(), check=True)


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
            record = real_run(cfg_path, args, out)
        for run in json.loads(record.read_text())["runs"]:
            sim = simulate(cfg_path, run, db, args.seed)
            rows.append({"layout": layout, "rate": run["rate"],
                         "compare": compare(run["stats"], sim)})
    text = table(rows)
    print(text)
    errs = [abs(c["error"]) for r in rows for c in r["compare"].values() if c["error"] is not None]
    within = sum(e <= 0.15 for e in errs)
    print(f"{within}/{len(errs)} figures within 15%; worst {max(errs):.0%}" if errs else "no data")
    (out / "comparison.md").write_text(text + "\n")
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
