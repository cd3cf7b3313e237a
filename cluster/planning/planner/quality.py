"""The quality axis: each setting's perplexity increase against the
reference dtypes, from the profile database's quality rows."""

from __future__ import annotations

import numpy as np

from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.planner.space import SpaceSpec
from splitserve.cluster.planning.shapes import ModelShape


def quality_increases(db: ProfileDB, shape: ModelShape,
                      space: SpaceSpec) -> dict[tuple[str, str], float]:
    """(weight dtype, kv dtype) -> relative perplexity increase against the
    reference (bf16 weights, KV in the weights' dtype), from the database's
    quality rows: a setting's row over the row of the same model, device and
    weight dtype with the reference KV. The reference itself is 0; a pair
    without rows is missing (unknown). An fp8 checkpoint's reference is
    itself: fp8 weights with the activations' KV."""
    rows = db.quality(shape.key) or db.quality(shape.name)
    by: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r["metric"] != "perplexity":
            continue
        parts = str(r["settings"]).split("/")
        if len(parts) < 3:
            continue
        device, dtype, kv = parts[0], parts[1], parts[2].removeprefix("kv-")
        by.setdefault((device, dtype, kv), []).append(float(r["value"]))
    out: dict[tuple[str, str], float] = {("bfloat16", "auto"): 0.0}
    fp8_kv = []
    for (device, dtype, kv), vals in by.items():
        if kv != "fp8" or dtype == "fp8":
            continue
        ref = by.get((device, dtype, dtype))
        if ref:
            fp8_kv.append(vals[-1] / ref[-1] - 1.0)
    if fp8_kv:
        out[("bfloat16", "fp8")] = float(np.mean(fp8_kv))
    fp8_w = []
    for (device, dtype, kv), vals in by.items():
        ref = by.get((device, "bfloat16", "bfloat16" if kv == "fp8" else kv))
        if dtype == "fp8" and kv != "fp8" and ref:
            fp8_w.append(vals[-1] / ref[-1] - 1.0)
    if fp8_w:
        out[("fp8", "auto")] = float(np.mean(fp8_w))
        if ("bfloat16", "fp8") in out:
            out[("fp8", "fp8")] = out[("fp8", "auto")] + out[("bfloat16", "fp8")]
    if shape.fp8_weights:  # an fp8 checkpoint: its own fp8 weights are the reference
        own = {("fp8", "auto"): 0.0}
        if ("bfloat16", "fp8") in out:
            own[("fp8", "fp8")] = out[("bfloat16", "fp8")]
        return own
    return out


def quality_rows(space: SpaceSpec, grid, q: dict) -> np.ndarray:
    """Each engine grid row's perplexity increase (NaN: unknown)."""
    vals = np.full(len(grid), np.nan)
    for k in range(len(grid)):
        key = (space.weight_dtypes[grid.wd[k]], space.kv_dtypes[grid.kv[k]])
        if key in q:
            vals[k] = q[key]
    return vals
