"""GPU telemetry through NVML (the ``nvidia-ml-py`` package, imported as
``pynvml``): utilization, memory and power of the devices a replica uses.

Without NVML (no driver, no GPU, the package missing) every call returns
``GpuTelemetry(available=False, reason=...)``: callers never need to guard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class DeviceSample:
    index: int  # NVML (physical) index
    name: str
    utilization_gpu: float  # % of time a kernel ran (SM activity), 0..100
    utilization_memory: float  # % of time device memory was read or written
    memory_used_bytes: int
    memory_total_bytes: int
    power_w: float | None  # None where the board does not report it


@dataclass(frozen=True)
class GpuTelemetry:
    available: bool
    reason: str = ""
    devices: list[DeviceSample] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {"available": True, "devices": [asdict(d) for d in self.devices]}


def _sample(nvml, index: int) -> DeviceSample:
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    util = nvml.nvmlDeviceGetUtilizationRates(h)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    try:
        power = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0  # milliwatts
    except nvml.NVMLError:
        power = None
    name = nvml.nvmlDeviceGetName(h)
    return DeviceSample(index, name.decode() if isinstance(name, bytes) else str(name),
                        float(util.gpu), float(util.memory), int(mem.used), int(mem.total), power)


def read_gpu_telemetry(device_indices: Sequence[int] | None = None) -> GpuTelemetry:
    """Sample ``device_indices`` (NVML indices; None: every device)."""
    try:
        import pynvml as nvml
    except ImportError:
        return GpuTelemetry(False, "nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        return GpuTelemetry(False, f"NVML is unavailable on this node: {e}")
    try:
        count = nvml.nvmlDeviceGetCount()
        indices = list(range(count)) if device_indices is None else [int(i) for i in device_indices]
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            return GpuTelemetry(False, f"GPU indices {bad} do not exist; NVML sees {count} device(s)")
        if not indices:
            return GpuTelemetry(False, "no GPU is assigned to this process")
        return GpuTelemetry(True, devices=[_sample(nvml, i) for i in indices])
    except nvml.NVMLError as e:
        return GpuTelemetry(False, f"NVML query failed: {e}")
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def replica_gpu_telemetry() -> GpuTelemetry:
    """Telemetry of the GPUs Ray assigned to the calling replica."""
    import ray

    if not ray.is_initialized():  # asking the runtime context would start Ray
        return GpuTelemetry(False, "not running in a Ray worker")
    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if not ids:
        return GpuTelemetry(False, "no GPU is assigned to this replica")
    return read_gpu_telemetry([int(i) for i in ids])
