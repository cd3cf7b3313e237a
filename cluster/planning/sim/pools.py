"""Pools of replicas on nodes, sized by the production autoscaler.

A pool is one Serve application (``<model>-prefill``, ``-decode`` or
``-colocated``) with its ``PoolSpec``. What the deployed cluster does per
pool, and when, is reproduced here:

- replicas push stats to the router every ``router.stats_period_s`` and
  autoscaling metrics every ``metrics_interval_s`` (through ``adapter``);
- every ``control_interval_s`` the Serve controller calls the bottleneck
  policy, i.e. ``decision.decide`` on the pool's metric series;
- a new replica takes a node slot (a new node after ``node_provision_s``
  when none is free), then serves after its start-up time;
- a replica removed by a scale-down drains as ``WorkerServer.drain`` does:
  marked draining (the router stops placing there), then gone when idle or
  after ``graceful_shutdown_timeout_s``;
- an injected failure kills a replica; Serve starts a replacement after
  ``replace_after_s``; the router forgets it after 3 stats TTLs of silence
  (``RouterActor.prune``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from splitserve.cluster.autoscaling.decision import DelayState
from splitserve.cluster.config import ModelSpec, PoolSpec
from splitserve.cluster.planning.kv_room import kv_blocks as room_blocks
from splitserve.cluster.planning.profiles import DeviceProfile
from splitserve.cluster.planning.records import EngineSettings
from splitserve.cluster.planning.shapes import ModelShape
from splitserve.cluster.planning.sim import adapter
from splitserve.cluster.planning.sim.metrics import PoolSample
from splitserve.cluster.planning.sim.replica import SimReplica
from splitserve.cluster.planning.sim.speculation import SimSpeculator

if TYPE_CHECKING:
    from splitserve.cluster.planning.sim.simulator import Simulation

STARTING, READY, DRAINING, FAILED, DEAD = "starting", "ready", "draining", "failed", "dead"


@dataclass
class Node:
    node_id: str
    free: int


@dataclass
class NodeGroup:
    """Nodes of one kind (hardware x node_type): ``devices`` slots each."""

    key: str
    devices: int
    network_bps: float
    intra_bps: float
    nodes: list[Node] = field(default_factory=list)

    def take(self, need: int) -> Node | None:
        for n in self.nodes:
            if n.free >= need:
                n.free -= need
                return n
        return None


@dataclass(eq=False)
class Slot:
    """One replica of a pool, through its life."""

    name: str
    rep: SimReplica | None
    state: str
    launched_at: float
    node: Node | None
    devices: int
    ready_at: float | None = None
    gone_at: float | None = None
    snapshot_next: bool = True
    busy_mark: tuple[float, float] = (0.0, 0.0)  # (time, busy seconds) at the last sample
    requests: set = field(default_factory=set)  # requests with work here (serving layer)


class Pool:
    def __init__(self, sim: "Simulation", app: str, model: str, role: str, spec: PoolSpec,
                 mspec: ModelSpec, profile: DeviceProfile, nodes: NodeGroup, num_blocks: int):
        self.sim = sim
        self.app = app
        self.model = model
        self.role = role
        self.spec = spec
        self.mspec = mspec
        self.profile = profile
        self.nodes = nodes
        self.num_blocks = num_blocks
        self.slots: list[Slot] = []
        self.target = spec.initial_replicas if spec.initial_replicas is not None else spec.min_replicas
        self.state: DelayState | None = None
        auto = spec.autoscaling
        self.series = adapter.PoolSeriesBuffer(auto.look_back_s) if auto else None
        self.samples: list[PoolSample] = []
        self.decisions: list[dict] = []
        self._count = 0

    # -- membership -------------------------------------------------------------------
    def live(self) -> list[Slot]:
        return [s for s in self.slots if s.state != DEAD]

    def ready(self) -> list[Slot]:
        return [s for s in self.slots if s.state == READY]

    def serving_count(self) -> int:
        """Replicas counted against the target (starting, ready, or failed and
        not yet replaced)."""
        return sum(1 for s in self.slots if s.state in (STARTING, READY, FAILED))

    def launch(self) -> Slot:
        sim = self.sim
        self._count += 1
        name = f"{self.app}-{self._count}"
        need = self.profile.devices
        node = self.nodes.take(need)
        delay = self.profile.startup_s if sim.opts.replica_start_s is None \
            else sim.opts.replica_start_s
        if node is None:
            node = Node(f"{self.nodes.key}-node{len(self.nodes.nodes) + 1}", self.nodes.devices - need)
            self.nodes.nodes.append(node)
            sim.network.add_node(node.node_id, self.nodes.network_bps, self.nodes.intra_bps)
            delay += sim.opts.node_provision_s
        slot = Slot(name, None, STARTING, sim.loop.now, node, need)
        self.slots.append(slot)
        sim.loop.after(delay, self._ready, slot)
        return slot

    def _speculator(self, name: str) -> SimSpeculator | None:
        """Decode and colocated replicas speculate as the model's
        ``speculative`` section says; acceptance draws seeded by the run's
        seed and the replica's name."""
        spec = self.mspec.speculative
        if spec is None or self.role == "prefill":
            return None
        opts = self.sim.opts
        device = "cpu" if self.profile.hardware.key.startswith("cpu:") else "cuda"
        return SimSpeculator.from_spec(spec, device, self.sim.acceptance[self.model].rate,
                                       opts.draft_cost_ratio, f"{opts.seed}/{name}")

    def speculation(self) -> dict | None:
        """What the pool's replicas speculated (None: they do not)."""
        spec = self.mspec.speculative
        if spec is None or self.role == "prefill":
            return None
        specs = [s.rep.spec for s in self.slots if s.rep is not None]
        drafts = sum(x.draft_tokens for x in specs)
        accepted = sum(x.accepted_tokens for x in specs)
        steps = sum(x.verify_steps for x in specs)
        verified = sum(x.verified for x in specs)
        acc = self.sim.acceptance[self.model]
        return {"method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens,
                "acceptance_assumed": acc.rate, "acceptance_source": acc.source,
                "acceptance": acc.describe(),
                "verify_steps": steps, "draft_tokens": drafts, "accepted_tokens": accepted,
                "acceptance_measured": accepted / drafts if drafts else None,
                "mean_accepted_length": 1 + accepted / verified if verified else None}

    def _ready(self, slot: Slot) -> None:
        if slot.state != STARTING:
            return
        sim = self.sim
        m = self.mspec
        slot.rep = SimReplica(
            sim.loop, slot.name, self.role, self.model, slot.node.node_id, self.profile.step,
            self.num_blocks, m.block_size, m.max_num_seqs, m.max_num_batched_tokens,
            sim.serving, sim.itl, coalesce=sim.opts.coalesce, spec=self._speculator(slot.name))
        slot.state = READY
        slot.ready_at = sim.loop.now
        slot.busy_mark = (sim.loop.now, 0.0)
        sim.replicas[slot.name] = slot
        self._push(slot)
        if self.series is not None:
            self._metrics(slot)

    def _gone(self, slot: Slot) -> None:
        if slot.state == DEAD:
            return
        slot.state = DEAD
        slot.gone_at = self.sim.loop.now
        if slot.node is not None:
            slot.node.free += slot.devices
        if self.series is not None:
            self.series.forget(slot.name)

    def device_seconds_at(self, t: float) -> float:
        """Device-seconds of every replica from its launch to its end or ``t``."""
        total = 0.0
        for s in self.slots:
            end = t if s.gone_at is None else min(s.gone_at, t)
            total += s.devices * max(0.0, end - s.launched_at)
        return total

    # -- periodic pushes --------------------------------------------------------------
    def _push(self, slot: Slot) -> None:
        """A replica's stats push to the router (``WorkerServer._push_loop``)."""
        if slot.state not in (READY, DRAINING) or not slot.rep.alive:
            return
        sim = self.sim
        slot.snapshot_next = adapter.push_to_router(sim.service, slot.rep, sim.loop.now,
                                                    slot.snapshot_next)
        sim.serving.resolve()
        sim.loop.after(sim.cfg.router.stats_period_s, self._push, slot)

    def _metrics(self, slot: Slot) -> None:
        """A replica's autoscaling metrics (``record_autoscaling_stats``)."""
        if slot.state not in (READY, DRAINING) or not slot.rep.alive:
            return
        self.series.record(slot.name, self.sim.loop.now,
                           adapter.autoscaling_metrics(slot.rep, self.sim.loop.now))
        self.sim.loop.after(self.spec.autoscaling.metrics_interval_s, self._metrics, slot)

    # -- the Serve controller -------------------------------------------------------------
    def control(self) -> None:
        """One tick of the autoscaling policy, then reconcile to the target."""
        sim = self.sim
        now = sim.loop.now
        spec = self.spec
        if spec.autoscaling is not None:
            ready = len(self.ready())
            d = sim.decide(self.series, spec.autoscaling, self.target, spec.min_replicas,
                           spec.max_replicas, now, self.state, ready)
            self.state = d.state
            if d.prefer_local_prefill is not None:
                sim.router.set_prefer_local_prefill(d.prefer_local_prefill)
            if d.target != self.target:
                self.decisions.append({"t": now, "from": self.target, "to": d.target,
                                       "reason": d.reason})
            self.target = d.target
        self.reconcile()

    def reconcile(self) -> None:
        have = self.serving_count()
        for _ in range(self.target - have):
            self.launch()
        if have > self.target:
            # Serve stops replicas still starting first, then the newest
            victims = sorted((s for s in self.slots if s.state in (STARTING, READY)),
                             key=lambda s: (s.state != STARTING, -s.launched_at, s.name))
            for slot in victims[: have - self.target]:
                self.stop(slot)

    def stop(self, slot: Slot) -> None:
        if slot.state == STARTING:
            self._gone(slot)
            return
        sim = self.sim
        slot.state = DRAINING
        slot.rep.draining = True
        adapter.push_to_router(sim.service, slot.rep, sim.loop.now, False)
        sim.serving.resolve()
        deadline = sim.loop.now + self.spec.graceful_shutdown_timeout_s
        settle = 2 * sim.cfg.router.stats_period_s + 0.5
        sim.loop.after(min(settle, self.spec.graceful_shutdown_timeout_s), self._drain_check,
                       (slot, deadline))

    def _drain_check(self, arg) -> None:
        slot, deadline = arg
        if slot.state != DRAINING:
            return
        sim = self.sim
        rep = slot.rep
        idle = not rep.sched.has_unfinished() and not rep.reservations and not rep.inflight
        if idle or sim.loop.now >= deadline:
            sim.service.remove_replica(slot.name)
            if not idle:
                sim.serving.replica_lost(slot, rep.kill())
            rep.alive = False
            self._gone(slot)
            return
        sim.loop.after(min(0.5, max(deadline - sim.loop.now, 0.0)), self._drain_check, arg)

    def fail(self, slot: Slot) -> None:
        """An injected failure: the replica dies now."""
        if slot.state not in (READY, DRAINING):
            return
        sim = self.sim
        held = slot.rep.kill()
        slot.state = FAILED
        sim.serving.replica_lost(slot, held)
        # the router forgets it after 3 TTLs of silence; Serve's health check
        # finds it dead and replaces it
        sim.loop.after(3 * sim.cfg.router.stats_ttl_s,
                       lambda _: sim.service.remove_replica(slot.name))
        sim.loop.after(sim.opts.replace_after_s, self._replace, slot)

    def _replace(self, slot: Slot) -> None:
        self._gone(slot)
        self.reconcile()

    # -- timeline ----------------------------------------------------------------------
    def sample(self) -> None:
        now = self.sim.loop.now
        busy, kv, waiting, pending, running = [], [], 0, 0, 0
        for s in self.slots:
            if s.state not in (READY, DRAINING):
                continue
            rep = s.rep
            rep.sync(now)
            b = rep.busy_time_at(now)
            t0, b0 = s.busy_mark
            if now > t0:
                busy.append(min(1.0, (b - b0) / (now - t0)))
            s.busy_mark = (now, b)
            kv.append(1.0 - rep.kv.num_free_blocks / rep.kv.num_blocks)
            waiting += len(rep.sched.waiting) + len(rep.sched.parked)
            pending += rep.pending_prompt_tokens()
            running += len(rep.sched.running)
        counts = {STARTING: 0, READY: 0, DRAINING: 0}
        for s in self.slots:
            if s.state in counts:
                counts[s.state] += 1
        self.samples.append(PoolSample(
            now, self.target, counts[READY], counts[STARTING], counts[DRAINING],
            sum(busy) / len(busy) if busy else 0.0, sum(kv) / len(kv) if kv else 0.0,
            waiting, pending, running))


def kv_blocks(mspec: ModelSpec, shape: ModelShape, settings: EngineSettings) -> int:
    """``engine.model_runner.num_kv_blocks`` for a replica of this spec
    (``kv_room.kv_blocks``): at tensor-parallel degree N each rank gives
    ``kv_cache_memory_gb`` to its share of the KV heads (max(1, Hk/N) of
    them), after a hybrid model's recurrent states (2 x max_num_seqs live
    slots and the prefix cache's state checkpoints). 0: the states alone
    fill it."""
    if mspec.num_blocks is not None:
        return mspec.num_blocks
    return room_blocks(shape, int(mspec.kv_cache_memory_gb * (1 << 30)), kv_dtype=settings.kv_dtype,
                       dtype=settings.dtype, block_size=mspec.block_size,
                       max_num_seqs=mspec.max_num_seqs, tensor_parallel=mspec.tensor_parallel_size,
                       max_model_len=mspec.max_model_len, state_checkpoints=spec_checkpoints(mspec))


def spec_checkpoints(mspec: ModelSpec) -> int:
    """A model's state checkpoints, as its engine counts them
    (``engine.model_runner.num_state_checkpoints``)."""
    if not mspec.enable_prefix_caching:
        return 0
    return mspec.max_num_seqs if mspec.state_checkpoints is None else mspec.state_checkpoints


def devices_for(spec: PoolSpec, on_gpu: bool, tensor_parallel_size: int = 1) -> int:
    """GPUs one replica computes on: its tensor-parallel ranks (num_gpus is
    per rank), or, at TP 1, what num_gpus reserves."""
    if not on_gpu:
        return 1
    return max(tensor_parallel_size, math.ceil(spec.num_gpus) * tensor_parallel_size, 1)
