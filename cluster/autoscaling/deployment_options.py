"""Serve deployment options of an autoscaled pool, and the replica version
that lets an edited config reach running replicas without replacing them.

Serve replaces every replica of a deployment whose version changes and
reconfigures them in place otherwise; by default each ``serve.run`` gets a
random version. ``replica_version`` is instead a digest of what a replica
was built from (its constructor arguments, resources and the code), so
re-applying a config whose only change is autoscaling (bounds, targets,
delays) keeps the replicas and their ids.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

from splitserve.cluster.autoscaling.serve_policy import POLICY_PATH
from splitserve.cluster.config import PoolSpec

# the packages a replica runs (import names); their source is part of its version
_CODE_PACKAGES = tuple(f"splitserve.{name}" for name in (
    "kernels", "engine", "handoff", "prefill", "decode", "router", "cluster"))


def serve_autoscaling_config(pool: PoolSpec, role: str, model: str) -> dict[str, Any]:
    """Serve's ``autoscaling_config`` for a pool with ``autoscaling`` set.
    Serve's own delays are zero: ``decision.decide`` applies the operator's."""
    a = pool.autoscaling
    if a is None:
        raise ValueError("serve_autoscaling_config needs a pool with autoscaling set")
    return {
        "min_replicas": pool.min_replicas,
        "max_replicas": pool.max_replicas,
        "initial_replicas": pool.initial_replicas,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "look_back_period_s": a.look_back_s,
        "metrics_interval_s": a.metrics_interval_s,
        "policy": {"policy_function": POLICY_PATH,
                   "policy_kwargs": {"spec": a.model_dump(), "role": role, "model": model}},
    }


def code_fingerprint() -> str:
    """Digest of the source of every package a replica imports."""
    h = hashlib.blake2b(digest_size=8)
    for pkg in _CODE_PACKAGES:
        # wherever it is installed (a source tree or site-packages)
        root = Path(list(importlib.import_module(pkg).__path__)[0])
        for f in sorted(root.rglob("*.py")):
            h.update(f"{pkg}/{f.relative_to(root).as_posix()}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def replica_version(init_args: tuple, ray_actor_options: dict[str, Any]) -> str:
    """Changes exactly when replicas must be rebuilt."""
    blob = json.dumps([list(init_args), ray_actor_options], sort_keys=True, default=str)
    return hashlib.blake2b((blob + code_fingerprint()).encode(), digest_size=12).hexdigest()
