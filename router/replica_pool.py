"""One model's prefill or decode replicas, kept in the orders policies read.

RouterCore holds one ``ReplicaPool`` per (model, role) and changes it on
every stats push and every optimistic placement update, while every
decision reads it. So the pool keeps, at all times, the stats by replica id
(in id order) and in the pool's ranking order (``queue_order`` for prefill,
``load_order`` for decode): ``put`` and ``pop`` move one replica with a
bisection into a sorted list of ranks, and ``snapshot`` copies the views at C
speed instead of sorting per decision. It also keeps, per node, the
replicas on that node in ranking order (immutable tuples, replaced on a
change: a node holds a few replicas), so a search that favours the nodes
of a placement reads them without scanning the pool.
"""

from __future__ import annotations

from bisect import bisect_left
from types import MappingProxyType
from typing import Callable, Generic, Iterator, Sequence, TypeVar

from splitserve.router.types import ClusterSnapshot, DecodeReplicaStats, PrefillReplicaStats

R = TypeVar("R", PrefillReplicaStats, DecodeReplicaStats)

_new_object = object.__new__


class ReplicaPool(Generic[R]):
    def __init__(self, rank: Callable[[R], float], track_nodes: bool = True):
        """Replicas ranked by ascending ``(rank(stats), replica_id)``
        (``queue_rank`` for prefill, ``load_rank`` for decode: the orders
        ``queue_order`` / ``load_order`` name). ``track_nodes``: keep the
        per-node groups (``by_node``); False for a pool nobody asks that of
        (RouterCore's decode pools), which then skips their upkeep on every
        change and has no groups."""
        self._rank = rank
        self._track_nodes = track_nodes
        self._by_id: dict[str, R] = {}  # in replica-id order
        # rank of each of _ordered: bisecting floats costs a fraction of
        # bisecting (rank, id) tuples; ties are settled on the ids (_position)
        self._ranks: list[float] = []
        self._ordered: list[R] = []
        self._max_speed: float | None = 0.0  # None: recompute on next read
        self._views: tuple | None = None  # views() until the next change
        # node id -> its replicas' ranks / stats, in ranking order (known nodes only)
        self._node_ranks: dict[str, tuple[float, ...]] = {}
        self._node_stats: dict[str, tuple[R, ...]] = {}
        self._by_node: MappingProxyType | None = None  # by_node() until the next change

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, replica_id: str) -> bool:
        return replica_id in self._by_id

    def __iter__(self) -> Iterator[R]:
        """Stats in replica-id order."""
        return iter(tuple(self._by_id.values()))

    def get(self, replica_id: str) -> R | None:
        return self._by_id.get(replica_id)

    def put(self, stats: R) -> None:
        """Add ``stats``, or replace the stats held for its replica."""
        self._views = None
        rid = stats.replica_id
        by_id = self._by_id
        old = by_id.get(rid)
        by_id[rid] = stats
        rank = self._rank(stats)
        node = stats.node_id if self._track_nodes else ""
        if old is None:
            self._by_id = dict(sorted(by_id.items()))  # a new replica: rare
        elif old.node_id == stats.node_id:
            # The common case (a counted placement, a push): one move in the
            # pool's order and one rebuild of the node's group.
            # (_position, inline: a call costs as much as the bisection)
            ranks, ordered, old_rank = self._ranks, self._ordered, self._rank(old)
            i = bisect_left(ranks, old_rank)
            while ordered[i] is not old:  # among equal ranks
                i += 1
            del ranks[i], ordered[i]
            i, n = bisect_left(ranks, rank), len(ranks)
            while i < n and ranks[i] == rank and ordered[i].replica_id < rid:
                i += 1
            ranks.insert(i, rank)
            ordered.insert(i, stats)
            if node:
                node_ranks, group = list(self._node_ranks[node]), list(self._node_stats[node])
                j = _position(node_ranks, group, old_rank, rid)
                del node_ranks[j], group[j]
                j = _position(node_ranks, group, rank, rid)
                node_ranks.insert(j, rank)
                group.insert(j, stats)
                self._node_ranks[node], self._node_stats[node] = tuple(node_ranks), tuple(group)
                self._by_node = None
            if old.prefill_tokens_per_s != stats.prefill_tokens_per_s:
                self._max_speed = None
            return
        else:
            self._remove_ordered(old)
        i = _position(self._ranks, self._ordered, rank, rid)
        self._ranks.insert(i, rank)
        self._ordered.insert(i, stats)
        if node:
            self._node_insert(node, rank, stats)
        if old is None or old.prefill_tokens_per_s != stats.prefill_tokens_per_s:
            self._max_speed = None

    def pop(self, replica_id: str) -> R | None:
        """Remove and return a replica's stats; None if it is not here."""
        old = self._by_id.pop(replica_id, None)
        if old is not None:
            self._views = None
            self._remove_ordered(old)
            self._max_speed = None
        return old

    def by_node(self) -> MappingProxyType:
        """node id -> the stats of the replicas on it, in ranking order (a
        copy; replicas whose node is unknown are in none; empty in a pool
        made with ``track_nodes=False``)."""
        if self._by_node is None:
            self._by_node = MappingProxyType(self._node_stats.copy())
        return self._by_node

    def views(self) -> tuple[tuple[R, ...], dict[str, R], tuple[R, ...], float]:
        """Copies of (stats in id order, stats by id, stats in ranking
        order, highest measured prefill speed): a snapshot's view of the pool.
        Unchanged pools hand out the same (immutable) views again."""
        if self._views is None:
            if self._max_speed is None:
                self._max_speed = max((s.prefill_tokens_per_s for s in self._ordered), default=0.0)
            self._views = (
                tuple(self._by_id.values()),
                MappingProxyType(dict(self._by_id)),
                tuple(self._ordered),
                self._max_speed,
            )
        return self._views

    def live(self) -> tuple[dict[str, R], list[R], float, dict[str, tuple[R, ...]]]:
        """The pool's own (stats by id, in id order; stats in ranking order;
        highest measured prefill speed; node id -> its replicas in ranking
        order), not copies: valid until the next ``put`` or ``pop``, for a
        caller that reads them and changes nothing before it is done (a
        decision inside ``RouterCore.route``; ``views`` copies for anyone
        else)."""
        if self._max_speed is None:
            self._max_speed = max((s.prefill_tokens_per_s for s in self._ordered), default=0.0)
        return self._by_id, self._ordered, self._max_speed, self._node_stats

    def _remove_ordered(self, stats: R) -> None:
        rank, rid = self._rank(stats), stats.replica_id
        i = _position(self._ranks, self._ordered, rank, rid)
        del self._ranks[i]
        del self._ordered[i]
        node = stats.node_id if self._track_nodes else ""
        if node:
            ranks, group = self._node_ranks[node], self._node_stats[node]
            j = _position(ranks, group, rank, rid)
            if len(ranks) == 1:
                del self._node_ranks[node], self._node_stats[node]
            else:
                self._node_ranks[node] = ranks[:j] + ranks[j + 1:]
                self._node_stats[node] = group[:j] + group[j + 1:]
            self._by_node = None

    def _node_insert(self, node: str, rank: float, stats: R) -> None:
        ranks, group = self._node_ranks.get(node, ()), self._node_stats.get(node, ())
        j = _position(ranks, group, rank, stats.replica_id)
        self._node_ranks[node] = ranks[:j] + (rank,) + ranks[j:]
        self._node_stats[node] = group[:j] + (stats,) + group[j:]
        self._by_node = None


def _position(ranks: Sequence[float], ordered: Sequence[R], rank: float, replica_id: str) -> int:
    """Where ``(rank, replica_id)`` goes in ``ordered`` (ascending (rank,
    replica id), ``ranks`` its ranks): bisect_left over the (rank, id) keys,
    with the floats bisected and a tie of ranks settled on the ids."""
    i = bisect_left(ranks, rank)
    n = len(ranks)
    while i < n and ranks[i] == rank and ordered[i].replica_id < replica_id:
        i += 1
    return i


def make_snapshot(
    prefill: ReplicaPool[PrefillReplicaStats], decode: ReplicaPool[DecodeReplicaStats], now: float
) -> ClusterSnapshot:
    p_ids, p_by_id, p_ordered, p_speed = prefill.views()
    d_ids, d_by_id, d_ordered, _ = decode.views()
    return ClusterSnapshot(
        prefill=p_ids,
        decode=d_ids,
        now=now,
        prefill_by_id=p_by_id,
        decode_by_id=d_by_id,
        prefill_by_queue=p_ordered,
        decode_by_load=d_ordered,
        max_prefill_tokens_per_s=p_speed,
        prefill_by_node=prefill.by_node(),
    )


def make_live_snapshot(
    prefill: ReplicaPool[PrefillReplicaStats], decode: ReplicaPool[DecodeReplicaStats], now: float
) -> ClusterSnapshot:
    """A snapshot over the pools' own containers (``ReplicaPool.live``), for
    one decision made before either pool changes: no copies per decision.
    Its ``prefill``/``decode`` are the id-ordered values views, not tuples
    (policies only iterate them and test them for emptiness)."""
    p_by_id, p_ordered, p_speed, p_nodes = prefill.live()
    d_by_id, d_ordered, _, _ = decode.live()
    # Filled slot by slot, as the stats' counting(): every view is given, so
    # the constructor's __post_init__ has nothing to derive, and calling the
    # class costs more than the rest of this function (once per decision;
    # tests/unit/test_replica_pool.py checks every field is set).
    snap = _new_object(ClusterSnapshot)
    snap.prefill = p_by_id.values()
    snap.decode = d_by_id.values()
    snap.now = now
    snap.prefill_by_id = p_by_id
    snap.decode_by_id = d_by_id
    snap.prefill_by_queue = p_ordered
    snap.decode_by_load = d_ordered
    snap.max_prefill_tokens_per_s = p_speed
    snap.prefill_by_node = p_nodes
    return snap
