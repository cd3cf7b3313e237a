"""KV transfers over links: bandwidth, latency and contention per node.

Every node has a NIC (egress and ingress, ``network_bandwidth`` each way)
and an intra-node link between its devices. A transfer between two nodes
is a flow that shares its source's egress and its destination's ingress
with the other flows there: its rate is the smaller of the two fair shares
(and of the transport's own ceiling, e.g. what Python gRPC reaches), and
is recomputed whenever a flow starts or ends at either node. A transfer
within a node takes the intra-node link at the transport's ceiling. Every
transfer also pays the link latency and the transport's fixed overhead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from splitserve.cluster.planning.sim.events import EventLoop


@dataclass
class NodeLinks:
    node_id: str
    network_bps: float  # bytes/s each way
    intra_bps: float
    out_flows: set = field(default_factory=set)
    in_flows: set = field(default_factory=set)
    bytes_out: float = 0.0


@dataclass(eq=False)
class Flow:
    src: NodeLinks
    dst: NodeLinks
    remaining: float
    on_done: Callable[[], None]
    rate: float = 0.0
    since: float = 0.0
    epoch: int = 0
    nbytes: float = 0.0
    seq: int = 0  # creation order: rebalancing visits flows in it (deterministic)


class Network:
    def __init__(self, loop: EventLoop, latency_s: float = 20e-6, overhead_s: float = 0.0,
                 transport_bps: float | None = None):
        self.loop = loop
        self.latency_s = latency_s
        self.overhead_s = overhead_s
        self.transport_bps = transport_bps  # per-flow ceiling of the transport, None: none
        self.nodes: dict[str, NodeLinks] = {}
        self.bytes_moved = 0.0
        self.transfers = 0

    def add_node(self, node_id: str, network_bps: float, intra_bps: float) -> None:
        self.nodes[node_id] = NodeLinks(node_id, network_bps, intra_bps)

    def transfer(self, src: str, dst: str, nbytes: float, on_done: Callable[[], None]) -> None:
        """Move ``nbytes`` from node ``src`` to node ``dst``; ``on_done()`` at arrival."""
        self.transfers += 1
        self.bytes_moved += nbytes
        fixed = self.latency_s + self.overhead_s
        if nbytes <= 0:
            self.loop.after(fixed, lambda _: on_done())
            return
        a, b = self.nodes[src], self.nodes[dst]
        if src == dst:
            rate = a.intra_bps if self.transport_bps is None else min(a.intra_bps, self.transport_bps)
            self.loop.after(fixed + nbytes / rate, lambda _: on_done())
            return
        a.bytes_out += nbytes
        f = Flow(a, b, nbytes, on_done, since=self.loop.now, nbytes=nbytes, seq=self.transfers)
        a.out_flows.add(f)
        b.in_flows.add(f)
        self._rebalance(a, b)

    def _rate(self, f: Flow) -> float:
        r = min(f.src.network_bps / len(f.src.out_flows), f.dst.network_bps / len(f.dst.in_flows))
        return r if self.transport_bps is None else min(r, self.transport_bps)

    def _rebalance(self, *nodes: NodeLinks) -> None:
        now = self.loop.now
        flows = set()
        for n in nodes:
            flows |= n.out_flows | n.in_flows
        for f in sorted(flows, key=lambda f: f.seq):
            f.remaining -= f.rate * (now - f.since)
            f.since = now
            f.rate = self._rate(f)
            f.epoch += 1
            self.loop.at(now + max(f.remaining, 0.0) / f.rate, self._finish, (f, f.epoch))

    def _finish(self, arg) -> None:
        f, epoch = arg
        if epoch != f.epoch:
            return
        f.src.out_flows.discard(f)
        f.dst.in_flows.discard(f)
        self._rebalance(f.src, f.dst)
        self.loop.after(self.latency_s + self.overhead_s, lambda _: f.on_done())

    def utilization(self, node_id: str) -> int:
        n = self.nodes[node_id]
        return len(n.out_flows) + len(n.in_flows)
