"""What every stage of ``splitserve plan`` reads: the request, the profile
database, the devices on offer, the engine-settings grid with each row's
quality, and the step-time forms of each device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitserve.cluster.planning.acceptance import Acceptance, resolve
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
    # each speculation method of the space: the acceptance rate both stages use
    acceptance: dict[str, Acceptance]

    @property
    def acceptance_rates(self) -> dict[str, float]:
        return {m: a.rate for m, a in self.acceptance.items()}

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
                   max(1.0, float(np.percentile(uncached, 5))), plan_acceptance(req, db))


def plan_acceptance(req: PlanRequest, db: ProfileDB) -> dict[str, Acceptance]:
    """The acceptance of each speculation method in the space: the rate given
    (``SpaceSpec.spec_acceptance``), else the database's measured rate for
    the model (of the workload's kind when it names one), else the assumed."""
    methods = sorted({name.split(":")[0] for name in req.space.speculative if name != "off"})
    given = req.space.spec_acceptance
    return {m: Acceptance(m, given, "given") if given is not None
            else resolve(db, req.shape.key, m, req.spec_workload) for m in methods}
