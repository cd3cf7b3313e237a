"""What every stage of ``splitserve plan`` reads: the request, the profile
database, the devices on offer, the engine-settings grid with each row's
quality, and the step-time forms of each device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.planner.devices import Device, FormCache, resolve_devices
from splitserve.cluster.planning.planner.quality import quality_increases, quality_rows
from splitserve.cluster.planning.planner.request import PlanRequest
from splitserve.cluster.planning.planner.space import EngineGrid, SpaceSpec, engine_grid


@dataclass
class PlanContext:
    req: PlanRequest
    db: ProfileDB
    devices: list[Device]
    grid: EngineGrid
    forms: FormCache
    quality_table: dict[tuple[str, str], float]  # (weight dtype, KV dtype) -> ppl increase
    quality: np.ndarray  # per grid row (NaN: unknown)
    quality_class: np.ndarray  # per grid row: the dtypes, one class per quality
    short_prompt: float  # the workload's 5th percentile of uncached prompt tokens

    @property
    def space(self) -> SpaceSpec:
        return self.req.space

    @classmethod
    def build(cls, req: PlanRequest, db: ProfileDB) -> "PlanContext":
        grid = engine_grid(req.space)
        q = quality_increases(db, req.shape, req.space)
        uncached = np.maximum(1, req.workload.inputs - req.workload.cached)
        return cls(req, db, resolve_devices(db, req.offers), grid, FormCache(db, req.shape), q,
                   quality_rows(req.space, grid, q), grid.kv * 4 + grid.wd,
                   max(1.0, float(np.percentile(uncached, 5))))
