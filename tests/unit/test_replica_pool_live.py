"""A pool without per-node groups keeps the same orders as one with them,
and ``live()`` hands out what ``views()`` copies."""

import random

from splitserve.router.replica_pool import ReplicaPool
from splitserve.router.types import PrefillReplicaStats, queue_rank
from tests.unit.test_replica_pool import pre


def test_untracked_pool_keeps_the_same_orders_and_no_node_groups():
    rng = random.Random(5)
    tracked: ReplicaPool[PrefillReplicaStats] = ReplicaPool(queue_rank)
    untracked: ReplicaPool[PrefillReplicaStats] = ReplicaPool(queue_rank, track_nodes=False)
    for _ in range(500):
        rid = f"p{rng.randrange(10)}"
        if rng.random() < 0.15:
            assert tracked.pop(rid) == untracked.pop(rid)
        else:
            s = pre(rng, rid)  # node changes at random too
            tracked.put(s)
            untracked.put(s)
        ids, by_id, ordered, speed = tracked.views()
        assert untracked.views() == (ids, by_id, ordered, speed)
        live_by_id, live_ordered, live_speed, live_nodes = tracked.live()
        assert (tuple(live_by_id.values()), dict(live_by_id), tuple(live_ordered), live_speed) == (
            ids, dict(by_id), ordered, speed)
        assert dict(live_nodes) == dict(tracked.by_node())
        assert all(s.node_id for g in live_nodes.values() for s in g)
        assert len(untracked.by_node()) == 0
