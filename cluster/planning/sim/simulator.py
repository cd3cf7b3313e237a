"""``Simulation``: an operator config, hardware per pool, a workload -> a run.

It builds what ``splitserve deploy`` would: the router (the production
``RouterCore`` with the config's policy, fed by every replica's stats and
prefix-cache events), one pool per Serve application with its bounds and
autoscaling spec (sized by the production ``decision.decide``), replicas
running the engine's ``Scheduler`` and KV manager with step times from the
profile database, and a network between the nodes. The cluster starts
warm (initial replicas serving at t = 0); arrivals follow the workload;
the run ends when every request has ended (or ``drain_s`` after the last
arrival).
"""

from __future__ import annotations

import gc
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.planning import profiles
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.hardware import local_cpu_key
from splitserve.cluster.planning.kv_room import STATE_SLOTS_PER_SEQ, state_slots
from splitserve.cluster.planning.shapes import ModelShape
from splitserve.cluster.planning.sim import adapter
from splitserve.cluster.planning.sim.events import EventLoop
from splitserve.cluster.planning.sim.metrics import LogHistogram, RequestLog, summarize
from splitserve.cluster.planning.sim.network import Network
from splitserve.cluster.planning.sim.options import (Failure, SimConfigError, SimOptions,
                                                     engine_settings, scale_blocks)
from splitserve.cluster.planning.sim.pools import NodeGroup, Pool, devices_for, kv_blocks, spec_checkpoints
from splitserve.cluster.planning.sim.serving import HOLDER, Serving, SimRequest
from splitserve.cluster.planning.acceptance import Acceptance
from splitserve.cluster.planning.acceptance import resolve as resolve_acceptance
from splitserve.cluster.planning.workload import TraceRequest, prompt_block_hashes
from splitserve.engine.roles import Role
from splitserve.router.exchange import Exchange
from splitserve.router.service import RouterService

LOCAL = "local"  # hardware name of this machine's CPU (its measured profile)
# new tracked objects (net of those freed) between two passes of the cyclic
# garbage collector during a run; the interpreter's default is 700
GC_THRESHOLD = 200_000


@dataclass
class SimResult:
    record: dict
    pools: dict[str, Pool] = field(repr=False)


def _draft_key(spec) -> str | None:
    """The draft checkpoint's key (name@digest) when it is a folder here, so
    only its acceptance rows are read; None: any draft's (not here, or n-gram)."""
    if spec.method != "draft" or not spec.draft_model or not Path(spec.draft_model).is_dir():
        return None
    from splitserve.cluster.planning.shapes import shape_from_config_json

    return shape_from_config_json(spec.draft_model, Path(spec.draft_model).name).key


class Simulation:
    def __init__(self, cfg: ClusterConfig, shapes: dict[str, ModelShape],
                 hardware: Callable[[str, str], str], db: ProfileDB,
                 workload: Iterable[TraceRequest], opts: SimOptions = SimOptions(),
                 model: str | None = None):
        if opts.kv_block_scale > 1:
            cfg = scale_blocks(cfg, opts.kv_block_scale)
        self.cfg = cfg
        self.opts = opts
        self.loop = EventLoop()
        self.rng = random.Random(opts.seed)
        names = [m.model.name for m in cfg.models]
        self.model = model or names[0]
        if self.model not in names:
            raise SimConfigError(f"model {self.model!r} is not in the config; it serves {names}")
        missing = [n for n in names if n not in shapes]
        if missing:
            raise SimConfigError(f"no model shape for {missing}; give --shape NAME=PRESET|DIR")
        self._specs = {m.model.name: m.model for m in cfg.models}
        # each speculating model's acceptance rate and where it came from
        self.acceptance: dict[str, Acceptance] = {}
        for m in cfg.models:
            sp = m.model.speculative
            if sp is None or m.model.name not in shapes:
                continue
            given = opts.given_acceptance(sp.method)
            self.acceptance[m.model.name] = (
                Acceptance(sp.method, given, "given") if given is not None else
                resolve_acceptance(db, shapes[m.model.name].key, sp.method, opts.spec_workload,
                                   _draft_key(sp)))
        self._kv: dict[str, int] = {}
        self._state: dict[str, int] = {}  # a hybrid's recurrent states per hand-off
        self.pools: dict[str, Pool] = {}
        groups: dict[str, NodeGroup] = {}
        self.replicas: dict = {}  # replica name -> Slot (ready at least once)
        self.itl = LogHistogram()
        self.log = RequestLog()
        self.decide = adapter.decide
        plans = []
        for served in cfg.models:
            roles = [("colocated", served.decode)] if served.mode == "colocated" else [
                ("prefill", served.prefill), ("decode", served.decode)]
            for role, spec in roles:
                m = served.engine_spec(Role(role))  # the model's engine, the pool's settings over it
                key = hardware(m.name, role)
                tp = m.tensor_parallel_size  # the pool's, or the model's
                if key == LOCAL:  # CPU ranks share the replica's cores: timed as its threads
                    key = local_cpu_key(max(1, int(spec.num_cpus * tp)))
                on_cpu = key.startswith("cpu:")
                devices = devices_for(spec, not on_cpu, tp)
                settings = engine_settings(m, "cpu" if on_cpu else "cuda", devices,
                                           shapes[m.name].fp8_weights)
                layout = served.mode if role != "prefill" and opts.serving_overhead else None
                try:
                    prof = profiles.device_profile(db, shapes[m.name], key, settings, layout)
                except profiles.UnknownHardwareError as e:
                    raise SimConfigError(str(e)) from None
                self._kv[m.name] = shapes[m.name].kv_bytes_per_token(settings.kv_dtype)
                self._state[m.name] = shapes[m.name].state_bytes_per_sequence(settings.dtype)
                per_node = (1 << 20) if on_cpu else opts.devices_per_node
                gkey = f"{key}/{spec.node_type or 'node'}"
                if gkey not in groups:
                    hw = prof.hardware
                    eff = hw.efficiency.network
                    groups[gkey] = NodeGroup(gkey, per_node,
                                             hw.network_bandwidth * eff * (1 if on_cpu else per_node),
                                             hw.intra_node_bandwidth)
                blocks = kv_blocks(m, shapes[m.name], settings)
                if not blocks:
                    raise SimConfigError(
                        f"{m.name} {role}: kv_cache_memory_gb {m.kv_cache_memory_gb} cannot hold the "
                        f"recurrent states of {state_slots(m.max_num_seqs, spec_checkpoints(m))} "
                        f"sequences ({STATE_SLOTS_PER_SEQ} per max_num_seqs, "
                        f"{spec_checkpoints(m)} state_checkpoints, "
                        f"{shapes[m.name].state_bytes_per_sequence(settings.dtype) / (1 << 20):.1f} "
                        "MiB each) and any KV block: raise kv_cache_memory_gb, or lower max_num_seqs "
                        "or state_checkpoints")
                plans.append((served, role, spec, m, prof, groups[gkey], blocks))
        # the router actor's service (wait queues, leases) over its RouterCore
        self.service = RouterService(adapter.router_config(cfg, self._kv), clock=self.loop.clock,
                                     incarnation="sim")
        self.router = self.service.core
        transport_bps = None
        if cfg.transfer.transport == "grpc":
            transport_bps = db.handoff_bytes_per_s("grpc")
        self.network = Network(self.loop, opts.network_latency_s, opts.rpc_s, transport_bps)
        self.serving = Serving(self)
        for served, role, spec, m, prof, group, blocks in plans:
            app = f"{m.name}-{role}"
            self.pools[app] = Pool(self, app, m.name, role, spec, m, prof, group, blocks)
        self._workload: Iterator[TraceRequest] = iter(workload)
        self._arrived = 0
        self._last_arrival = 0.0
        self._exhausted = False
        self._attempts = cfg.router.max_retries + 1
        # the ingress' share of the serving path (HTTP, tokenization, router
        # exchange), from the decode side's serving-overhead row
        self.request_s = {p.model: p.profile.request_s for p in self.pools.values()
                          if p.role != "prefill"}

    # -- lookups for the layers ---------------------------------------------------------
    def block_size(self, model: str) -> int:
        return self._specs[model].block_size

    def kv_bytes(self, model: str) -> int:
        return self._kv[model]

    def state_bytes(self, model: str) -> int:
        """What a hand-off carries per request beside the KV: the recurrent states."""
        return self._state[model]

    # -- arrivals ----------------------------------------------------------------------------
    def _next_arrival(self, _=None) -> None:
        tr = next(self._workload, None)
        if tr is None:
            self._exhausted = True
            return
        self.loop.at(tr.arrival_s, self._arrive, tr)

    def _arrive(self, tr: TraceRequest) -> None:
        idx = self._arrived
        self._arrived += 1
        self._last_arrival = self.loop.now
        bs = self.block_size(self.model)
        req = SimRequest(idx, self.model, self.loop.now, tr.input_len, tr.output_len,
                         prompt_block_hashes(tr, idx, bs), self._attempts)
        self.serving.arrive(req)
        self._next_arrival()

    # -- periodic work ------------------------------------------------------------------------
    def _control(self, _=None) -> None:
        # the router actor's tick (queue deadlines, expired leases), and the
        # ingress' heartbeat that keeps its leases
        self.service.exchange(Exchange(HOLDER, self.service.incarnation))
        self.service.tick()
        self.serving.resolve()
        for pool in self.pools.values():
            pool.control()
        self.loop.after(self.opts.control_interval_s, self._control)

    def _sample(self, _=None) -> None:
        for pool in self.pools.values():
            pool.sample()
        self.loop.after(self.opts.sample_s, self._sample)

    def _fail(self, f: Failure) -> None:
        pool = self.pools.get(f.pool) or next(
            (p for p in self.pools.values() if p.role == f.pool), None)
        if pool is None:
            raise SimConfigError(f"failure names pool {f.pool!r}; pools: {sorted(self.pools)}")
        ready = sorted(pool.ready(), key=lambda s: s.name)
        for slot in self.rng.sample(ready, min(f.count, len(ready))):
            pool.fail(slot)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> SimResult:
        opts = self.opts
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for pool in self.pools.values():
            for _ in range(pool.target):
                slot = pool.launch()
                pool._ready(slot)  # a warm cluster: initial replicas serve from t = 0
        for f in opts.failures:
            self.loop.at(f.at_s, self._fail_event, f)
        self._control()
        self._sample()
        self._next_arrival()
        chunk = 10.0
        progress = _Progress(opts.progress)
        # The run allocates and frees millions of small objects with few
        # reference cycles (an ended request's are cut in ``Serving._end``),
        # so the cyclic collector's frequent passes over the young objects
        # cost much (a fifth of the run) and reclaim little: run it
        # rarely, and as before once the run is over.
        thresholds = gc.get_threshold()
        gc.set_threshold(GC_THRESHOLD, *thresholds[1:])
        try:
            while True:
                self.loop.run(self.loop.now + chunk)
                progress.show(self.loop.now, self._arrived, self.serving.finished, wall0)
                if self._exhausted and self.serving.in_flight == 0:
                    break
                if self._exhausted and self.loop.now > self._last_arrival + opts.drain_s:
                    break
        finally:
            gc.set_threshold(*thresholds)
        progress.close()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        return SimResult(self._record(wall, cpu), self.pools)

    def _fail_event(self, f: Failure) -> None:
        self._fail(f)

    def _record(self, wall_s: float, cpu_s: float) -> dict:
        now = self.loop.now
        ends = np.frombuffer(self.log.arrival, dtype=np.float64) + np.frombuffer(
            self.log.e2e, dtype=np.float64) if len(self.log) else np.zeros(0)
        ends = ends[~np.isnan(ends)]
        duration = max(float(ends.max()) if len(ends) else now, self._last_arrival) or now
        slo = self.cfg.slo
        summary = summarize(self.log, self.itl, duration, slo.ttft_s, slo.tpot_s)
        pools = {}
        device_h = cost = 0.0
        priced = True
        peak = 0
        for app, pool in self.pools.items():
            dh = pool.device_seconds_at(duration) / 3600.0
            price = pool.profile.hardware.price_per_hour
            device_h += dh
            if price is None:
                priced = False
            else:
                cost += dh * price
            peak_rep = max((s.ready + s.starting + s.draining for s in pool.samples), default=0)
            peak += peak_rep * pool.profile.devices
            pools[app] = {
                "role": pool.role, "model": pool.model,
                "bounds": {"min": pool.spec.min_replicas, "max": pool.spec.max_replicas},
                "autoscaling": pool.spec.autoscaling.bottleneck if pool.spec.autoscaling else None,
                "profile": pool.profile.describe(), "kv_blocks_per_replica": pool.num_blocks,
                "device_hours": dh, "cost_usd": None if price is None else dh * price,
                "peak_replicas": peak_rep, "scale_events": pool.decisions,
                "speculation": pool.speculation(),
                "timeline": [asdict(s) for s in pool.samples],
            }
        mean_devices = device_h * 3600.0 / duration if duration > 0 else float("nan")
        summary["goodput_per_device"] = summary["goodput"] / mean_devices if mean_devices else 0.0
        c = self.router.counters()
        return {
            "config": self.cfg.name, "model": self.model, "options": _options(self.opts),
            "summary": summary, "pools": pools,
            "cost": {"device_hours": device_h, "usd": cost if priced else None,
                     "mean_devices": mean_devices, "peak_devices": peak,
                     "usd_per_million_output_tokens": (
                         cost / (summary["output_throughput"] * duration) * 1e6
                         if priced and summary["output_throughput"] > 0 else None)},
            "router": {"queued": self.service.counts["queued"],
                       "refusals": dict(self.service.refusals),
                       "decisions": c.decisions, "local_prefill": c.local_prefill,
                       "by_reason": c.by_reason, "no_capacity": c.no_capacity,
                       "overloaded": c.overloaded, "queue_delay": c.queue_delay},
            "network": {"transfers": self.network.transfers, "bytes": self.network.bytes_moved,
                        "transport_ceiling_bytes_per_s": self.network.transport_bps},
            "sim": {"events": self.loop.processed, "wall_s": wall_s, "cpu_s": cpu_s,
                    "simulated_s": duration,
                    "speed_x_real_time": duration / wall_s if wall_s > 0 else float("inf"),
                    "speed_x_real_time_cpu": duration / cpu_s if cpu_s > 0 else float("inf"),
                    "requests": self._arrived},
        }


def _options(o: SimOptions) -> dict:
    d = asdict(o)
    d["failures"] = [asdict(f) for f in o.failures]
    return d


class _Progress:
    """One stderr line: simulated time, requests, speed against real time."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._last = 0.0

    def show(self, sim_s: float, arrived: int, done: int, wall0: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.2:
            return
        self._last = now
        wall = now - wall0
        sys.stderr.write(f"\rsimulated {sim_s:9.1f}s  requests {done}/{arrived}  "
                         f"wall {wall:6.1f}s  {sim_s / max(wall, 1e-9):7.1f}x real time")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
