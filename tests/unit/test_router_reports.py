"""The router's view of a replica's report (``router.reports.replica_stats``)."""

from splitserve.engine.roles import Role
from splitserve.router.eligibility import decode_usable
from splitserve.router.reports import ReplicaInfo, StatsReport, replica_stats
from tests.fixtures.worker_stats import decode_stats, engine_load


def _report(stats) -> StatsReport:
    info = ReplicaInfo(replica_id="d0", role=Role.DECODE, model="m", kv_endpoint="", node_id="")
    return StatsReport(replica=info, stats=stats, healthy=True, draining=False, updated_at=10.0,
                       stored=(), evicted=(), snapshot=False)


def test_open_hand_off_reservations_count_against_the_batch():
    """A reservation's sequence joins the batch when its KV arrives: the
    router must count it, or it places past ``max_seqs`` while prompts are
    being prefilled elsewhere."""
    load = engine_load(running=5, waiting=1, max_seqs=8)
    d = replica_stats(_report(decode_stats(load, reservations=2)))
    assert (d.running_seqs, d.waiting_requests) == (5, 3)
    assert not decode_usable(d, "m", 0.0, frozenset(), 16)  # batch full: 5 + 3 of 8
    d = replica_stats(_report(decode_stats(load, reservations=1)))
    assert decode_usable(d, "m", 0.0, frozenset(), 16)
