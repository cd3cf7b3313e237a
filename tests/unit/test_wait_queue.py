"""The router's per-model wait queue on its own: resumed streams first,
then lower priority (as vLLM's ``priority``), then arrival, then insertion; each entry keeps its
deadline; removal while walking."""

from splitserve.router.types import RouteRequest
from splitserve.router.wait_queue import WaitQueue, Waiting


def entry(lease, priority=0, arrival=0.0, deadline=float("inf"), resumed=False):
    req = RouteRequest(lease, "m", 8, 4, block_hashes=())
    return Waiting(lease, "h", req, priority, arrival, arrival, deadline, resumed, resumed)


def order(q):
    return [e.lease_id for e in q]


def test_lower_priority_first_then_arrival_then_insertion():
    q = WaitQueue()
    for e in (entry("late", arrival=3.0), entry("early", arrival=1.0),
              entry("urgent", priority=-1, arrival=5.0), entry("batch", priority=10, arrival=0.0),
              entry("tie-a", arrival=2.0), entry("tie-b", arrival=2.0)):
        q.add(e)
    assert order(q) == ["urgent", "early", "tie-a", "tie-b", "late", "batch"]
    assert q.first_key() == (True, -1, 5.0, q.first_key()[3])
    assert len(q) == 6 and "late" in q and "gone" not in q
    q.add(entry("resumed", priority=10, arrival=9.0, resumed=True))  # ahead of every new one
    assert order(q)[:2] == ["resumed", "urgent"]


def test_a_request_added_again_keeps_one_entry_and_takes_its_new_place():
    q = WaitQueue()
    q.add(entry("a", arrival=1.0))
    q.add(entry("b", arrival=2.0))
    q.add(entry("a", priority=-3, arrival=1.0))  # moved back here with a priority
    assert order(q) == ["a", "b"] and len(q) == 2
    q.add(entry("a", priority=3, arrival=1.0))
    assert order(q) == ["b", "a"]


def test_removal_while_walking_and_deadlines_kept():
    q = WaitQueue()
    for i in range(5):
        q.add(entry(f"r{i}", arrival=float(i), deadline=10.0 + i))
    for e in q:  # the walk is over a copy
        if e.deadline <= 12.0:
            assert q.remove(e.lease_id) is e
    assert order(q) == ["r3", "r4"] and [e.deadline for e in q] == [13.0, 14.0]
    assert q.remove("r0") is None
    assert q.oldest_wait_s(10.0) == 7.0
    q.remove("r3"), q.remove("r4")
    assert len(q) == 0 and q.first_key() is None and q.oldest_wait_s(10.0) == 0.0
