"""The devices a plan may use, and the step-time forms of each: the offers
resolved against the profile database (measured rows first, else the
catalog's datasheet figures), and one step model per device, TP degree and
dtypes, as the simulator builds it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitserve.cluster.config import ModelSpec
from splitserve.cluster.planning import profiles
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.hardware import Hardware, local_cpu_key
from splitserve.cluster.planning.planner.inputs import Offer, PlanInputError
from splitserve.cluster.planning.shapes import ModelShape

DEVICES_PER_NODE = 8


@dataclass(frozen=True)
class Device:
    index: int
    key: str  # profile database key
    sim_key: str  # what the simulator is told ("local" for this CPU)
    hw: Hardware
    price: float  # per device-hour
    count: int
    cpu: bool
    threads: int = 1  # CPU threads of one replica

    @property
    def label(self) -> str:
        return "local CPU" if self.sim_key == "local" else self.key


def resolve_devices(db: ProfileDB, offers: list[Offer]) -> list[Device]:
    out = []
    for i, off in enumerate(offers):
        if off.key == "local":
            key, sim_key, cpu = local_cpu_key(1), "local", True
        else:
            key, sim_key, cpu = off.key, off.key, off.key.startswith("cpu:")
        try:
            hw = profiles.hardware(db, key)
        except profiles.UnknownHardwareError as e:
            hint = " (run `splitserve profile` on this machine first)" if off.key == "local" else ""
            raise PlanInputError(f"{e}{hint}") from None
        price = off.price if off.price is not None else hw.price_per_hour
        if price is None:
            price = 0.0
        out.append(Device(i, key, sim_key, hw, float(price), off.count, cpu))
    if len({d.key for d in out}) != len(out):
        raise PlanInputError("each hardware kind may be offered once")
    return out


def engine_settings_for(dev: Device, tp: int, wd: str, kv: str):
    """The speed-relevant settings of a replica, built by the simulator's
    ``engine_settings`` (fp8 weights included)."""
    from splitserve.cluster.planning.sim.options import engine_settings

    weight = "fp8" if wd == "fp8" else "auto"
    if dev.cpu:
        return engine_settings(ModelSpec(dtype="auto", kv_cache_dtype=kv, device="cpu",
                                         weight_dtype=weight), "cpu", 1)
    return engine_settings(ModelSpec(dtype="bfloat16", kv_cache_dtype=kv, weight_dtype=weight),
                           "cuda", tp)


class FormCache:
    def __init__(self, db: ProfileDB, shape: ModelShape):
        self.db = db
        self.shape = shape
        self._cache: dict = {}

    def get(self, dev: Device, tp: int, wd: str, kv: str):
        key = (dev.index, tp, wd, kv)
        if key not in self._cache:
            settings = engine_settings_for(dev, tp, wd, kv)
            model = profiles.step_model(self.db, self.shape, dev.hw, settings)
            forms = list(model.forms)
            if len(forms) == 1:
                forms = forms * 2
            # a mixture of experts' routed read (StepTimeModel.unread_s), on its form
            unread = np.zeros(2)
            if model.routed_s:
                unread[min(model.routed_form, 1)] = model.routed_s
            self._cache[key] = (np.array(forms[:2]), model.overhead_s, model.provenance,
                                model.describe(), settings, (unread, model.expert_pass))
        return self._cache[key]
