"""The ops ledger's size history (``splitserve status --history``): the
decisions at which a pool's target or running count changed, in order,
bounded; and how the Serve policy publishes a new running count at once."""

import time

from splitserve.cluster.autoscaling import ledger, serve_policy
from splitserve.cluster.autoscaling.decision import decide
from splitserve.cluster.autoscaling.records import DecisionRecord
from splitserve.cluster.cli.ops import format_history
from tests.unit.test_autoscaling import prefill_series, spec


def rec(t, running, target, current=None, reason="r"):
    current = target if current is None else current
    return DecisionRecord(app="m-decode", model="m", role="decode", bottleneck="memory", time=t,
                          running=running, current=current, target=target, desired=target,
                          value=1.0, reason=reason, min=1, max=3, changed=current != target,
                          prefer_local_prefill=None)


def test_history_keeps_size_changes_only_and_is_bounded():
    led = ledger.OpsLedger.__ray_actor_class__()
    seq = [rec(1.0, 1, 1), rec(2.0, 1, 1), rec(3.0, 1, 2, current=1, reason="scale up 1 -> 2"),
           rec(4.0, 1, 2), rec(9.0, 2, 2), rec(10.0, 2, 2)]
    for r in seq:
        led.record_decision("m-decode", r)
    assert [(d.time, d.running, d.target) for d in led.history()["m-decode"]] == [
        (1.0, 1, 1), (3.0, 1, 2), (9.0, 2, 2)]
    assert led.decisions()["m-decode"].last_change.time == 3.0
    led.forget("m-decode")
    assert led.history() == {}
    led = ledger.OpsLedger.__ray_actor_class__(history_len=3)
    for i in range(5):
        led.record_decision("m-decode", rec(float(i), i, i))
    assert [d.time for d in led.history()["m-decode"]] == [2.0, 3.0, 4.0]


def test_format_history():
    t = 1_700_000_000.25
    text = format_history({"m-decode": [rec(t, 1, 2, current=1, reason="scale up 1 -> 2: x")]})
    assert text.splitlines() == [
        "m-decode:", f"  {time.strftime('%H:%M:%S', time.localtime(t))}.2  1/2  scale up 1 -> 2: x"]
    assert format_history({}) == "no autoscaling decisions recorded"


def test_a_new_running_count_is_published_at_once(monkeypatch):
    sent = []
    monkeypatch.setattr(serve_policy.publish, "record_decision",
                        lambda app, r: sent.append(r.running) or True)
    sp = spec()
    d = decide(prefill_series(0, 0.5, 1000), sp, current=2, min=1, max=4, now=100.0)
    kw = {"spec": sp.model_dump(), "role": "prefill", "model": "m"}
    pub = {}
    for running, now in ((1, 100.0), (1, 100.1), (2, 100.2)):
        r = serve_policy.decision_record("m-prefill", kw, d, running, 2, 1, 4, now)
        pub = serve_policy._publish("m-prefill", kw, d, r, pub, now)
    assert sent == [1, 2]  # the unchanged second tick waits for PUBLISH_EVERY_S


def test_one_deploy_holds_the_lease_at_a_time(monkeypatch):
    led = ledger.OpsLedger.__ray_actor_class__()
    now = [1000.0]
    monkeypatch.setattr(ledger.time, "time", lambda: now[0])
    assert led.begin_deploy("a", 60.0) is None
    now[0] += 5
    assert led.begin_deploy("b", 60.0) == ("a", 1000.0)  # refused: a still applies
    led.reset()  # a stale ledger forgotten mid-deploy keeps the lease
    assert led.begin_deploy("b", 60.0) == ("a", 1000.0)
    led.end_deploy("b")  # not b's to give back
    assert led.begin_deploy("b", 60.0) == ("a", 1000.0)
    led.end_deploy("a")
    assert led.begin_deploy("b", 60.0) is None
    now[0] += 61  # b died without giving it back: its lease expires
    assert led.begin_deploy("c", 60.0) is None
