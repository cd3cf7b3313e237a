"""Autoscaling on a real multi-node Ray cluster on loopback: a head node and
two worker nodes, one carrying the ``prefill_node`` resource and one the
``decode_node`` resource.

Replicas land on their node types; a prompt-heavy load scales the prefill
pool and not decode; a long-generation load scales decode and not prefill;
an edited YAML applied live changes the bounds while the running replicas
stay; shrinking a pool under load loses no request.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import pytest
import ray
import yaml

from splitserve.cluster.serve import app
from splitserve.cluster.cli import ops as cli_ops
from splitserve.cluster.autoscaling.ledger import get_ledger
from splitserve.cluster.serve.orchestrator import ClusterBackend
from splitserve.cluster.config import load_config, parse_config
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.autoscale_cluster import LocalCluster, NodeSpec, running
from tests.integration.autoscale_load import (
    LoadResult,
    drive,
    replica_actor_ids,
    running_replicas,
    watch,
)
from tests.integration.pd_harness import make_engine

MODEL = "tiny"
PREFILL, DECODE = f"{MODEL}-prefill", f"{MODEL}-decode"
FAST = dict(upscale_delay_s=1.0, downscale_delay_s=2.0, cooldown_s=3.0, look_back_s=2.0,
            metrics_interval_s=0.5)


def config_dict(path, prefill=(1, 2), decode=(1, 2), kv_target=0.9):
    return {
        "name": "autoscale-test",
        "models": [{
            "model": {"name": MODEL, "path": str(path), "num_blocks": 1024, "block_size": 4,
                      "max_num_seqs": 8, "max_num_batched_tokens": 512},
            "prefill": {"min_replicas": prefill[0], "max_replicas": prefill[1], "num_cpus": 0,
                        "node_type": "prefill_node", "graceful_shutdown_timeout_s": 20,
                        "autoscaling": {"bottleneck": "compute", "target_ttft_s": 0.02,
                                        "target_busy_fraction": 0.9, **FAST}},
            "decode": {"min_replicas": decode[0], "max_replicas": decode[1], "num_cpus": 0,
                       "node_type": "decode_node", "graceful_shutdown_timeout_s": 20,
                       "autoscaling": {"bottleneck": "memory", "target_kv_usage": kv_target,
                                       "target_seq_fraction": 0.5, **FAST}},
        }],
        # every prompt is prefilled on the prefill pool
        "router": {"local_prefill_max_tokens": 0, "stats_period_s": 0.1, "stats_ttl_s": 2.0},
        "auth": {"cluster_token": "autoscale-token"},
    }


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    c = LocalCluster(NodeSpec({"head_node": 1}), [NodeSpec({"prefill_node": 4}),
                                                  NodeSpec({"decode_node": 4})])
    with running(c):
        app.deploy(parse_config(config_dict(tiny_llama)), address=c.address, with_ingress=False,
                   wait_s=240)
        yield c


def wait_for(cond, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.5)


def decisions():
    return ray.get(get_ledger().decisions.remote())


def router_replicas():
    reps = ray.get(app.get_router().replicas.remote())[MODEL]
    return ({r["replica_id"] for r in reps["prefill"]}, {r["replica_id"] for r in reps["decode"]})


def run_load(be, prompts, params, concurrency, stop_when, timeout_s, during=None):
    """Drive load until ``stop_when(result)`` (or the timeout); ``during`` is
    a coroutine run alongside (e.g. applying a config)."""
    res = LoadResult()
    t0 = time.monotonic()
    done = lambda: stop_when(res) or time.monotonic() - t0 > timeout_s  # noqa: E731

    async def main():
        jobs = [drive(be, MODEL, prompts, params, concurrency, done, res), watch(MODEL, res, done)]
        await asyncio.gather(*jobs, *([during(res)] if during else []))
    asyncio.run(main())
    return res


def test_replicas_land_on_their_node_types(cluster):
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 3
    reps = ray.get(app.get_router().replicas.remote())[MODEL]
    assert len(reps["prefill"]) == 1 and len(reps["decode"]) == 1
    for role, resource in (("prefill", "prefill_node"), ("decode", "decode_node")):
        for r in reps[role]:
            assert resource in nodes[r["node_id"]], (role, nodes[r["node_id"]])


def test_prompt_heavy_load_scales_prefill_not_decode(cluster, tiny_llama):
    be = ClusterBackend(parse_config(config_dict(tiny_llama)))
    prompts = [[(7 * i + j) % 500 + 3 for j in range(200)] for i in range(8)]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    res = run_load(be, prompts, params, 6, lambda r: any(p == 2 for _, p, _ in r.sizes), 90)
    assert not res.errors
    assert max(p for _, p, _ in res.sizes) == 2, res.reasons[-3:]
    assert {d for _, _, d in res.sizes} == {1}
    pre, dec = decisions()[PREFILL], decisions()[DECODE]
    assert pre.last_change.reason.startswith("scale up 1 -> 2: "), pre
    assert dec.last_change is None and dec.latest.target == 1, dec
    # idle again: back to one prefill replica after the downscale delay
    wait_for(lambda: running_replicas(PREFILL) == 1, 60, "prefill back to 1 replica")
    assert decisions()[PREFILL].last_change.reason.startswith("scale down 2 -> 1: ")
    assert running_replicas(DECODE) == 1
    asyncio.run(be.close())


def test_long_generation_scales_decode_not_prefill(cluster, tiny_llama):
    be = ClusterBackend(parse_config(config_dict(tiny_llama)))
    prompts = [[(11 * i + j) % 500 + 3 for j in range(4 + i % 3)] for i in range(8)]
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    res = run_load(be, prompts, params, 8, lambda r: any(d == 2 for _, _, d in r.sizes), 90)
    assert not res.errors
    assert max(d for _, _, d in res.sizes) == 2, res.reasons[-3:]
    assert {p for _, p, _ in res.sizes} == {1}
    dec = decisions()[DECODE].last_change
    assert dec.reason.startswith("scale up 1 -> 2: running sequences"), dec
    assert decisions()[PREFILL].latest.target == 1
    asyncio.run(be.close())


def cli(argv):
    parser = argparse.ArgumentParser(prog="splitserve")
    cli_ops.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_edited_yaml_applied_live_keeps_replicas(cluster, tiny_llama, tmp_path, capsys):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config_dict(tiny_llama)))
    assert cli(["deploy", str(path), "--address", cluster.address, "--no-ingress"]) == 0
    # earlier loads may have left a pool scaled up: wait until the extra
    # replicas are gone (drained and stopped), not only no longer running
    wait_for(lambda: all(running_replicas(a) == 1 and len(replica_actor_ids(a)) == 1
                         for a in (PREFILL, DECODE)), 90, "both pools at their minimum")
    wait_for(lambda: all(len(r) == 1 for r in router_replicas()), 30, "router to forget them")
    ids = {a: replica_actor_ids(a) for a in (PREFILL, DECODE)}
    addrs = router_replicas()
    capsys.readouterr()

    edited = config_dict(tiny_llama, prefill=(1, 3), decode=(2, 3), kv_target=0.8)
    path.write_text(yaml.safe_dump(edited))
    assert load_config(path).models[0].decode.min_replicas == 2
    assert cli(["deploy", str(path), "--address", cluster.address, "--no-ingress"]) == 0
    out = capsys.readouterr().out
    assert "4 change(s):" in out, out
    for line in ("models[tiny].decode.min_replicas: 1 -> 2",
                 "models[tiny].decode.max_replicas: 2 -> 3",
                 "models[tiny].prefill.max_replicas: 2 -> 3",
                 "models[tiny].decode.autoscaling.target_kv_usage: 0.9 -> 0.8"):
        assert line in out, out
    wait_for(lambda: running_replicas(DECODE) == 2, 60, "decode raised to its new minimum")
    # the replicas that were running are still the same ones
    assert replica_actor_ids(PREFILL) == ids[PREFILL]
    assert ids[DECODE] < replica_actor_ids(DECODE)
    wait_for(lambda: len(router_replicas()[1]) == 2, 30, "the new decode replica registered")
    assert router_replicas()[0] == addrs[0] and addrs[1] < router_replicas()[1]
    wait_for(lambda: decisions()[DECODE].latest.min == 2, 30, "the policy saw the bounds")
    assert decisions()[DECODE].latest.max == 3
    assert cli(["status", "--address", cluster.address]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:4]}
    assert rows[DECODE][1:5] == ["decode", "2/2", "2-3", "memory"], out
    assert rows[PREFILL][1:5] == ["prefill", "1/1", "1-3", "compute"], out
    assert f"  {DECODE}: " in out and "last change" in out


def test_scale_down_under_load_loses_no_request(cluster, tiny_llama):
    assert running_replicas(DECODE) == 2
    before = router_replicas()[1]
    cfg = parse_config(config_dict(tiny_llama, decode=(1, 1)))
    be = ClusterBackend(cfg)
    prompts = [[(5 * i + j) % 500 + 3 for j in range(3 + 4 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ref = make_engine(tiny_llama, block_size=4)
    want = [r.token_ids for r in ref.generate(prompts, params)]
    applied = []

    async def shrink(res):
        while len(res.outputs) < 6:  # requests in flight on both replicas
            await asyncio.sleep(0.1)
        await asyncio.to_thread(app.deploy, cfg, with_ingress=False)
        applied.append(time.monotonic())
    res = run_load(be, prompts, params, 6,
                   lambda r: bool(applied) and time.monotonic() - applied[0] > 2.0
                   and r.sizes[-1][2] == 1, 120, during=shrink)
    assert not res.errors
    assert res.sizes[-1][2] == 1
    for rid, toks in res.outputs.items():
        assert toks == want[res.prompts[rid]], rid
    # the removed replica deregisters once drained
    wait_for(lambda: len(router_replicas()[1]) == 1, 30, "the drained replica to deregister")
    removed = before - router_replicas()[1]
    assert len(removed) == 1
    on_removed = [rid for rid, d in res.decode_of.items() if d in removed]
    assert on_removed, "no request ran on the replica that was removed"
    assert all(rid in res.outputs for rid in on_removed)
    assert be.counters["resumed"] == 0  # none was cut off: the replica drained
    asyncio.run(be.close())
