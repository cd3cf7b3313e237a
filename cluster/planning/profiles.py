"""The best figures the database holds for a (model, hardware, settings):
measured where a measurement exists, else derived from the hardware's
figures (themselves measured where ``splitserve profile`` ran on that
device, else datasheet x efficiency)."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.hardware import Hardware
from splitserve.cluster.planning.records import DERIVED, EngineSettings
from splitserve.cluster.planning.shapes import ModelShape
from splitserve.cluster.planning.step_model import StepModelError, StepTimeModel, fit, roofline


class UnknownHardwareError(LookupError):
    def __init__(self, key: str, known: list[str]):
        super().__init__(f"no hardware {key!r} in the profile database; known: {known}. "
                         "Run `splitserve profile` on it, or add it to catalog.yaml")


@dataclass(frozen=True)
class DeviceProfile:
    """What the simulator needs to run one pool's replicas."""

    hardware: Hardware
    step: StepTimeModel
    startup_s: float
    startup_provenance: str
    devices: int  # per replica
    request_s: float = 0.0  # the serving path's cost per request beyond the modelled TTFT
    serving: dict | None = None  # the serving-overhead row folded into ``step`` and ``request_s``

    @property
    def price_per_replica_hour(self) -> float | None:
        p = self.hardware.price_per_hour
        return None if p is None else p * self.devices

    def describe(self) -> dict:
        return {"hardware": self.hardware.key, "hardware_provenance": self.hardware.provenance,
                "devices_per_replica": self.devices, "step_model": self.step.describe(),
                "step_model_provenance": self.step.provenance, "startup_s": self.startup_s,
                "startup_provenance": self.startup_provenance,
                "price_per_device_hour": self.hardware.price_per_hour,
                "price_source": self.hardware.price_source, "serving_overhead": self.serving}


def hardware(db: ProfileDB, key: str) -> Hardware:
    hw = db.hardware(key)
    if hw is None:
        raise UnknownHardwareError(key, db.hardware_keys())
    return hw


def step_model(db: ProfileDB, shape: ModelShape, hw: Hardware,
               settings: EngineSettings) -> StepTimeModel:
    """Fitted from measured rows of this model on this device at these
    speed settings; else the roofline of the shape on the hardware."""
    rows = db.step_samples(shape.key, hw.key, settings.speed_key)
    if len(rows) >= 3:
        try:
            return fit(rows, source=f"{len(rows)} measured steps of {shape.name} on {hw.key} "
                                    f"({settings.speed_key})")
        except StepModelError:
            pass
    return roofline(shape, hw, settings)


def startup(db: ProfileDB, shape: ModelShape, hw: Hardware,
            settings: EngineSettings) -> tuple[float, str]:
    """(seconds, provenance) from start to serving; derived: fixed start-up
    plus the weights (per device of the replica) at the load bandwidth."""
    got = db.startup_s(shape.key, hw.key)
    if got is not None:
        return got
    eff = hw.efficiency
    return (eff.startup_fixed_s
            + shape.weight_bytes(settings.dtype) / settings.tensor_parallel / eff.load_bytes_per_s,
            DERIVED)


def device_profile(db: ProfileDB, shape: ModelShape, hardware_key: str,
                   settings: EngineSettings, serving_layout: str | None = None) -> DeviceProfile:
    """The pool's figures; with ``serving_layout`` (a decode or colocated
    pool of that layout) its steps and requests also carry the serving
    path's measured overhead (``splitserve profile --serving-url``), when the
    database has it for this model and device."""
    hw = hardware(db, hardware_key)
    seconds, prov = startup(db, shape, hw, settings)
    step = step_model(db, shape, hw, settings)
    row = db.serving(shape.key, hw.key, serving_layout) if serving_layout else None
    if row is None:
        return DeviceProfile(hw, step, seconds, prov, settings.tensor_parallel)
    step = step.with_serving(row["per_step_s"], row["per_seq_s"],
                             f"{row['provenance']} {serving_layout} serving path, "
                             f"{row['requests']} probe requests")
    return DeviceProfile(hw, step, seconds, prov, settings.tensor_parallel,
                         row["per_request_s"], row)
