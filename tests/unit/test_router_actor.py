"""The router actor's methods, called on its class directly (no Ray): the
replies workers and ingresses act on."""

import time

from splitserve.cluster.serve.router_actor import RouterActor

Router = RouterActor.__ray_actor_class__


def prefill(rid="p0", pending=0):
    return dict(replica_id=rid, model="m", pending_prompt_tokens=pending, running_requests=0,
                prefill_tokens_per_s=10000.0, updated_at=time.time())


def decode(rid="d0"):
    return dict(replica_id=rid, model="m", free_blocks=100, total_blocks=100, running_seqs=0,
                max_seqs=8, block_size=16, waiting_requests=0, decode_step_s=0.01,
                prefill_tokens_per_s=0.0, updated_at=time.time())


def route_req(rid="r"):
    return {"request_id": rid, "model": "m", "prompt_len": 1000, "max_tokens": 4,
            "block_hashes": []}


def test_push_reply_asks_an_unknown_replica_for_a_snapshot_of_its_cache():
    r = Router({"policy": "cost", "kv_bytes_per_token": {"m": 1000}})
    info = {"role": "prefill", "model": "m"}
    assert r.update_stats("prefill", prefill(), info, [1, 2, 3]) is True  # a delta from a stranger
    assert r.update_stats("prefill", prefill(), info, [4]) is False
    assert r.cached_blocks() == {"p0": 4}
    # the snapshot replaces what deltas built up
    assert r.update_stats("prefill", prefill(), info, [2, 9], snapshot=True) is False
    assert r.cached_blocks() == {"p0": 2}
    # a reconfigure forgets everything: the next push is answered with a request again
    r.reconfigure({"policy": "cost", "kv_bytes_per_token": {"m": 1000}})
    assert r.update_stats("prefill", prefill(), info, []) is True
    assert r.update_stats("prefill", prefill(), info, [2, 9], snapshot=True) is False
    assert r.cached_blocks() == {"p0": 2}


def test_queue_delay_refusal_is_overloaded_with_retry_after_and_frees_the_slot():
    r = Router({"policy": "cost", "kv_bytes_per_token": {"m": 1000}, "max_queue_delay_s": 0.5,
                "max_queue_per_model": 1})
    r.update_stats("prefill", prefill(pending=8000))  # 0.8 s of queue at 10k tokens/s
    r.update_stats("decode", decode())
    res = r.route(route_req())
    assert res["error"] == "overloaded" and "max_queue_delay_s" in res["message"]
    assert abs(res["retry_after_s"] - 0.3) < 1e-9
    c = r.counters()
    assert (c["queue_delay"], c["in_flight"]) == (1, {"m": 0})  # the admission slot came back
    # a request already admitted (a retry or a resumed stream) is still placed
    assert r.route(route_req("resumed"), admit=False)["placement"]["prefill_replica"] == "p0"
