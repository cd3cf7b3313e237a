"""Hardware descriptions: the datasheet catalog, its efficiency model, and
this machine.

A ``Hardware`` is one device kind (one GPU, or this machine's CPU) with its
peak figures. Catalog entries come from ``catalog.yaml`` (datasheet peaks,
prices with their source); the profile database stores them as *derived*
rows and ``splitserve profile`` adds *measured* rows for the device it ran
on. Whatever reads a figure asks the database, where a measured row wins.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")


class CatalogError(ValueError):
    """catalog.yaml (or a copy given instead) is missing a key or has a bad value."""


@dataclass(frozen=True)
class Efficiency:
    """The share of a datasheet peak an engine reaches (see catalog.yaml)."""

    matmul: float = 0.6
    memory: float = 0.8
    network: float = 0.8
    tensor_parallel: float = 0.9
    step_overhead_s: float = 0.002
    load_bytes_per_s: float = 2.0e9
    startup_fixed_s: float = 30.0

    def describe(self) -> str:
        return (f"matmul {self.matmul:.0%} of peak FLOP/s, memory {self.memory:.0%} of peak "
                f"bandwidth, network {self.network:.0%} of line rate, tensor parallel "
                f"{self.tensor_parallel:.0%} per extra GPU, {self.step_overhead_s * 1e3:g} ms "
                f"per step")


@dataclass(frozen=True)
class Hardware:
    key: str  # catalog key (h100-sxm) or "cpu:<model>:<cores>" for a measured host
    name: str
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s
    memory_bandwidth: float  # bytes/s
    memory_bytes: float
    intra_node_bandwidth: float  # bytes/s between devices of one node
    network_bandwidth: float  # bytes/s per device to other nodes
    price_per_hour: float | None = None  # per device
    price_source: str = ""
    source: str = ""
    provenance: str = "derived"  # "measured" | "derived"
    host: str = ""
    efficiency: Efficiency = field(default_factory=Efficiency)

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; a dtype the device lacks (fp8 on A100)
        runs at its bf16 rate, as engines upcast it."""
        for d in (dtype, "bfloat16", "float16", "float32"):
            if self.peak_flops.get(d):
                return self.peak_flops[d]
        raise CatalogError(f"hardware {self.key!r} gives no peak FLOP/s")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _float(value) -> float:
    """float(value), but YAML's true/false is no figure (float() reads 1/0)."""
    if isinstance(value, bool):
        raise TypeError("a boolean")
    return float(value)


def _number(entry: dict, key: str, where: str) -> float:
    try:
        value = _float(entry[key])
    except KeyError:
        raise CatalogError(f"{where}: missing {key!r}") from None
    except (TypeError, ValueError):
        raise CatalogError(f"{where}: {key!r} must be a number, got {entry[key]!r}") from None
    if not math.isfinite(value):
        raise CatalogError(f"{where}: {key!r} must be a finite number, got {value}")
    if value <= 0:
        raise CatalogError(f"{where}: {key!r} must be > 0, got {value}")
    return value


_SHARES = ("matmul", "memory", "network", "tensor_parallel")  # fractions of a peak
# The keys of one GPU entry under ``gpus``; a price goes under prices.per_gpu_hour.
_GPU_KEYS = ("name", "peak_flops", "memory_bandwidth", "memory_bytes", "intra_node_bandwidth",
             "network_bandwidth", "source")


def _unknown_key(where: str, key, known, elsewhere: str = "") -> CatalogError:
    """A misspelt key (``sorce``) would drop its figure silently: refuse it,
    naming the keys and the likeliest one meant (else ``elsewhere``, where
    such a figure belongs instead)."""
    from splitserve.cluster.config.base import closest_key

    hint = closest_key(str(key), known)
    said = f" (did you mean {hint!r}?)" if hint else (f" ({elsewhere})" if elsewhere else "")
    return CatalogError(f"{where}: unknown key {key!r}{said}; the keys are {', '.join(known)}")


def _efficiency(data, p: Path) -> Efficiency:
    if not isinstance(data, dict):
        raise CatalogError(f"{p}: efficiency: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(Efficiency)]
    values = {}
    for k, v in data.items():
        if k not in names:
            raise _unknown_key(f"{p}: efficiency", k, names)
        try:
            x = _float(v)
        except (TypeError, ValueError):
            raise CatalogError(f"{p}: efficiency.{k} must be a number, got {v!r}") from None
        if k in _SHARES and not 0 < x <= 1:
            raise CatalogError(f"{p}: efficiency.{k} must be in (0, 1], got {x}")
        if not (math.isfinite(x) and x >= 0):
            raise CatalogError(f"{p}: efficiency.{k} must be a finite number >= 0, got {x}")
        values[k] = x
    return Efficiency(**values)


def _prices(data, p: Path) -> tuple[dict[str, float], str]:
    if not isinstance(data, dict):
        raise CatalogError(f"{p}: prices: expected a mapping, got {type(data).__name__}")
    per_hour = data.get("per_gpu_hour") or {}
    if not isinstance(per_hour, dict):
        raise CatalogError(f"{p}: prices.per_gpu_hour: expected a mapping of key -> price")
    out = {}
    for k, v in per_hour.items():
        try:
            x = _float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not (math.isfinite(x) and x >= 0):
            raise CatalogError(f"{p}: prices.per_gpu_hour.{k} must be a number >= 0, got {v!r}")
        out[k] = x
    return out, str(data.get("source", ""))


def load_catalog(path: str | Path = CATALOG_PATH) -> tuple[dict[str, Hardware], Efficiency, str]:
    """(key -> derived Hardware, the efficiency model, the prices' source)."""
    p = Path(path)
    try:
        from splitserve.cluster.config.lines import read_yaml

        # read_yaml: as safe_load, but a key written twice (an edited price
        # or figure below the old one) is refused instead of one winning unseen
        data, _ = read_yaml(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise CatalogError(f"{p}: cannot read the catalog: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CatalogError(f"{p}: cannot read the catalog: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CatalogError(f"{p}: invalid YAML: {where}{problem}") from None
    if not isinstance(data, dict) or "gpus" not in data:
        raise CatalogError(f"{p}: expected a mapping with 'gpus', 'efficiency' and 'prices'")
    eff = _efficiency(data.get("efficiency") or {}, p)
    per_hour, price_source = _prices(data.get("prices") or {}, p)
    if not isinstance(data["gpus"], dict):
        raise CatalogError(f"{p}: gpus: expected a mapping of key -> figures, got "
                           f"{type(data['gpus']).__name__}")
    out = {}
    for key, entry in data["gpus"].items():
        where = f"{p}: gpus.{key}"
        if not isinstance(entry, dict):
            raise CatalogError(f"{where}: expected a mapping of figures, got "
                               f"{type(entry).__name__}")
        for k in entry:
            if k not in _GPU_KEYS:
                raise _unknown_key(where, k, _GPU_KEYS, "a GPU's price goes under "
                                   "prices.per_gpu_hour" if str(k).startswith("price") else "")
        flops = entry.get("peak_flops")
        if not isinstance(flops, dict) or not flops:
            raise CatalogError(f"{where}: peak_flops must map dtype -> FLOP/s")
        out[key] = Hardware(
            key=key, name=str(entry.get("name", key)),
            peak_flops={d: _number(flops, d, f"{where}.peak_flops") for d in flops},
            memory_bandwidth=_number(entry, "memory_bandwidth", where),
            memory_bytes=_number(entry, "memory_bytes", where),
            intra_node_bandwidth=_number(entry, "intra_node_bandwidth", where),
            network_bandwidth=_number(entry, "network_bandwidth", where),
            price_per_hour=per_hour.get(key),
            price_source=price_source if key in per_hour else "",
            source=str(entry.get("source", "")), provenance="derived", efficiency=eff)
    return out, eff, price_source


@lru_cache(maxsize=1)
def catalog() -> dict[str, Hardware]:
    return load_catalog()[0]


def host_name() -> str:
    return platform.node() or "unknown-host"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def local_cpu_key(threads: int | None = None) -> str:
    """Key of this machine's CPU as a device: model name and cores used."""
    import torch

    n = threads or torch.get_num_threads() or os.cpu_count() or 1
    return f"cpu:{cpu_model()}:{n}"
