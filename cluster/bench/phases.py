"""How one request's latency splits into phases, from the client's clock and
the ``timings`` the decode replica attaches to the first output.

Decode-replica timings (``splitserve.decode.worker``): ``mode`` (remote | local),
``ttft_s`` (its receipt of the request -> first token), ``local_queue_s``
(local prefill: the wait in its engine's queue), and for a remote prefill
``prefill_s`` (prefill replica: receipt -> prompt computed),
``prefill_queue_s`` (the part of it spent in that engine's queue),
``handoff_s`` (the whole Prefill call), ``transfer_wait_s`` and ``bytes``.
Pure functions over floats: shared by the server's metrics and the bench.
"""

from __future__ import annotations

PHASES = ("queue", "prefill", "handoff", "decode")
TTFT_PARTS = ("queue", "prefill", "transfer", "first_token")


def has_phase_timings(timings: dict | None) -> bool:
    """Whether ``timings`` came from a decode replica (an ingress's own keys,
    ``ingress_*``, alone do not split TTFT)."""
    return bool(timings) and "ttft_s" in timings


def phase_breakdown(ttft_s: float, e2e_s: float, timings: dict | None) -> dict[str, float]:
    """Split one request's E2E latency into queue, prefill, handoff, decode:
    they add up to ``e2e_s``, the first three to ``ttft_s`` (client clock).

      queue   = ttft_s - timings.ttft_s: admission, routing, the RPC to the
                decode replica (and the ingress, seen from an HTTP client),
                plus the wait in the prefilling engine's own queue
      prefill = timings.prefill_s (remote) or timings.ttft_s (local), less
                that engine queue wait
      handoff = timings.ttft_s - timings.prefill_s: reservation, KV
                transfer, commit on the decode replica
      decode  = e2e_s - ttft_s
    Without timings (an ingress that does not forward them) TTFT counts as
    prefill."""
    t = timings or {}
    server_ttft = min(float(t.get("ttft_s", ttft_s)), ttft_s)
    if t.get("mode") == "remote" and "prefill_s" in t:
        prefill = min(float(t["prefill_s"]), server_ttft)
        handoff = server_ttft - prefill
        engine_queue = float(t.get("prefill_queue_s", 0.0))
    else:
        prefill, handoff = server_ttft, 0.0
        engine_queue = float(t.get("local_queue_s", 0.0))
    engine_queue = min(max(engine_queue, 0.0), prefill)
    return {"queue": ttft_s - server_ttft + engine_queue, "prefill": prefill - engine_queue,
            "handoff": handoff, "decode": max(e2e_s - ttft_s, 0.0)}


def ttft_breakdown(ttft_s: float, timings: dict | None) -> dict[str, float]:
    """TTFT as queue + prefill + transfer + first_token: ``transfer`` is the
    Prefill call beyond the prompt's compute (KV in flight, acks, metadata);
    ``first_token`` is the decode replica's part (reservation, commit,
    emitting the first token). For a local prefill both are 0."""
    p = phase_breakdown(ttft_s, ttft_s, timings)
    t = timings or {}
    transfer = 0.0
    if p["handoff"] > 0 and "handoff_s" in t:
        prefill_call = min(float(t["prefill_s"]), float(t["ttft_s"]))  # queue wait included
        transfer = min(max(float(t["handoff_s"]) - prefill_call, 0.0), p["handoff"])
    return {"queue": p["queue"], "prefill": p["prefill"], "transfer": transfer,
            "first_token": p["handoff"] - transfer}
