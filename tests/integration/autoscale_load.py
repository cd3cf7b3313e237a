"""Load and observation helpers for the autoscaling tests: drive requests
through ``ClusterBackend`` and read pool sizes from Serve and the router."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import ray

from splitserve.cluster.serve.app import serve_status
from splitserve.cluster.api.backend import Overloaded, Unavailable
from splitserve.cluster.serve.orchestrator import ClusterBackend
from splitserve.engine.sampling_params import SamplingParams


def running_replicas(app: str) -> int:
    st = serve_status().applications.get(app)
    if st is None:
        return 0
    dep = st.deployments.get(app)
    return 0 if dep is None else int(dep.replica_states.get("RUNNING", 0))


def replica_actor_ids(app: str) -> set[str]:
    """Serve's replica ids of a pool (from the replicas' actor names)."""
    out = set()
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and f"#{app}#" in a["name"]:
            out.add(a["name"].rsplit("#", 1)[1])
    return out


@dataclass
class LoadResult:
    outputs: dict[str, list[int]] = field(default_factory=dict)  # request id -> tokens
    prompts: dict[str, int] = field(default_factory=dict)  # request id -> prompt index
    errors: dict[str, str] = field(default_factory=dict)  # requests that failed
    decode_of: dict[str, str] = field(default_factory=dict)  # request id -> decode replica
    refusals: int = 0  # refused before any token (pool full), then sent again
    sizes: list[tuple[float, int, int]] = field(default_factory=list)  # (t, prefill, decode)
    reasons: list[dict[str, str]] = field(default_factory=list)  # app -> latest decision


async def drive(be: ClusterBackend, model: str, prompts: list[list[int]],
                params: SamplingParams, concurrency: int, until, result: LoadResult,
                prefix: str = "r") -> None:
    """Keep ``concurrency`` requests in flight, cycling through ``prompts``,
    until ``until()`` is true; every request started runs to its end. A
    request refused before its first token (no capacity: what a client sees
    as 503/429) is sent again, as clients do; any other failure is recorded."""
    counter = iter(range(10 ** 9))

    async def one(rid: str, prompt: list[int]) -> None:
        stop_retrying = None  # once the load is over, a request refused for this long fails
        while True:
            toks: list[int] = []
            try:
                async for d in be.generate(model, rid, prompt, params):
                    toks += d["token_ids"]
                    result.decode_of.setdefault(rid, d["placement"]["decode"])
                result.outputs[rid] = toks
                return
            except (Unavailable, Overloaded) as e:
                if toks:
                    result.errors[rid] = f"{type(e).__name__} after {len(toks)} tokens: {e}"
                    return
                result.refusals += 1
                if until():
                    stop_retrying = stop_retrying or time.monotonic() + 30.0
                    if time.monotonic() > stop_retrying:
                        result.errors[rid] = f"still refused 30 s after the load ended: {e}"
                        return
                await asyncio.sleep(min(e.retry_after_s, 0.2))
            except Exception as e:  # noqa: BLE001 - recorded and asserted on
                result.errors[rid] = f"{type(e).__name__}: {e}"
                return

    async def worker() -> None:
        while not until():
            i = next(counter)
            rid = f"{prefix}-{i}"
            result.prompts[rid] = i % len(prompts)
            await one(rid, prompts[i % len(prompts)])
    await asyncio.gather(*[worker() for _ in range(concurrency)])


async def watch(model: str, result: LoadResult, stop, period_s: float = 0.5) -> None:
    """Record pool sizes, and the autoscaler's latest reasons (for failure
    messages), until ``stop()``."""
    from splitserve.cluster.autoscaling.ledger import get_ledger

    ledger = get_ledger()
    while not stop():
        p, d = await asyncio.to_thread(
            lambda: (running_replicas(f"{model}-prefill"), running_replicas(f"{model}-decode")))
        result.sizes.append((time.monotonic(), p, d))
        latest = await ledger.decisions.remote()
        result.reasons.append({app: v.latest.reason for app, v in latest.items()})
        await asyncio.sleep(period_s)
