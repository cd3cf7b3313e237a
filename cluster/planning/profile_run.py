"""``splitserve profile``: what to measure (from ``--model`` or an operator
``--config``) and the run that measures it and writes the rows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.records import MEASURED, EngineSettings
from splitserve.cluster.planning.shapes import ModelShape, shape_from_config_json
from splitserve.cluster.planning.step_model import fit


@dataclass(frozen=True)
class ProfileTarget:
    name: str
    path: str  # checkpoint folder
    engine_kwargs: dict  # EngineConfig fields
    settings: EngineSettings
    shape: ModelShape


def _settings(engine, kv_cache_dtype: str, device: str, threads: int) -> EngineSettings:
    from splitserve.kernels.dispatch import backend_for

    dtype = str(engine.dtype).removeprefix("torch.")
    kv = "fp8" if kv_cache_dtype == "fp8" else dtype
    if getattr(engine.cfg, "weight_dtype", "auto") == "fp8":
        dtype = "fp8"  # fp8 weights' rows, as sim.simulator.engine_settings looks them up
    return EngineSettings(dtype=dtype, kv_dtype=kv, block_size=engine.cfg.block_size,
                          max_num_seqs=engine.cfg.max_num_seqs,
                          max_num_batched_tokens=engine.cfg.max_num_batched_tokens,
                          kernel_backend=backend_for(engine.device), device=device,
                          tensor_parallel=1)


def targets(model_dir: str | None, config_path: str | None, device: str = "cpu",
            dtype: str | None = None) -> list[ProfileTarget]:
    """One target per model: ``--model DIR`` with engine defaults, or each
    model of an operator config with its engine settings."""
    from splitserve.engine.default_model import default_model_path

    if config_path:
        from splitserve.cluster.config import load_config

        out = []
        for served in load_config(config_path).models:
            spec = served.model
            path = spec.path or str(default_model_path())
            kw = dict(model=path, model_id=spec.name,
                      dtype=None if spec.dtype == "auto" else spec.dtype, device=device,
                      block_size=spec.block_size, kv_cache_dtype=spec.kv_cache_dtype,
                      max_model_len=spec.max_model_len)
            out.append(ProfileTarget(spec.name, path, kw, EngineSettings(),
                                     shape_from_config_json(path, spec.name)))
        return out
    path = model_dir or str(default_model_path())
    name = Path(path).name
    kw = dict(model=path, model_id=name, dtype=dtype, device=device)
    return [ProfileTarget(name, path, kw, EngineSettings(), shape_from_config_json(path, name))]


def run(db: ProfileDB, target: ProfileTarget, fast: bool = False, quality: bool = True,
        handoff: bool = False, threads: int | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Measure ``target`` on this machine and write every row; returns a summary."""
    import torch

    from splitserve.cluster.planning import device_probe, profiler
    from splitserve.engine.config import EngineConfig

    if threads:
        torch.set_num_threads(threads)
    grid = profiler.FAST_GRID if fast else profiler.FULL_GRID
    device = target.engine_kwargs.get("device", "cpu")
    hw = device_probe.measure_device(device, fast=fast)
    db.put_hardware(hw)
    log(f"device {hw.key}: {max(hw.peak_flops.values()) / 1e9:.1f} GFLOP/s matmul, "
        f"{hw.memory_bandwidth / 1e9:.1f} GB/s copy")
    biggest = max(grid.prefill_tokens) + max(grid.cached_tokens) + max(grid.decode_seqs)
    kw = dict(target.engine_kwargs, num_blocks=2048,
              max_num_seqs=max(grid.decode_seqs) + 2,
              max_num_batched_tokens=max(biggest, 64))
    engine, startup_s = profiler.timed_engine(EngineConfig(**kw))
    settings = _settings(engine, kw.get("kv_cache_dtype", "auto"), device, 1)
    shape = target.shape
    db.put_model(shape)
    db.add_startup(shape, hw.key, startup_s, MEASURED)
    log(f"{target.name}: engine start {startup_s:.2f}s; {len(grid.points(engine.max_model_len, engine.cfg.block_size))} "
        f"step mixes x {grid.repeats} repeats")
    rows = profiler.profile_steps(engine, grid)
    db.add_step_samples(shape, hw.key, settings, rows, MEASURED)
    summary = {"model": target.name, "model_key": shape.key, "hardware": hw.key,
               "settings": settings.key, "rows": len(rows), "startup_s": startup_s}
    try:
        model = fit(rows)
        summary["fit"] = model.fit.describe()
        log(f"  step-time fit: {model.fit.describe()}")
    except ValueError as e:
        summary["fit"] = f"not fitted: {e}"
    if quality:
        text = profiler.HELDOUT_PATH.read_text()
        ppl, n = profiler.perplexity(engine, text, max_tokens=256 if fast else None)
        db.add_quality(shape, settings, "perplexity", ppl, profiler.HELDOUT_PATH.name, n)
        summary["perplexity"] = ppl
        log(f"  perplexity on {profiler.HELDOUT_PATH.name}: {ppl:.2f} over {n} tokens")
    if handoff:
        from splitserve.cluster.planning.handoff_probe import measure_transport

        mc = engine.model_cfg
        nbytes, secs = measure_transport("grpc", mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                         engine.cfg.block_size,
                                         total_bytes=(8 << 20) if fast else (64 << 20))
        db.add_handoff("grpc", hw.key, nbytes, secs, same_node=True)
        summary["handoff_grpc_bytes_per_s"] = nbytes / secs
        log(f"  grpc hand-off on loopback: {nbytes / secs / 1e6:.0f} MB/s")
    return summary


def with_overrides(t: ProfileTarget, **engine_kwargs) -> ProfileTarget:
    return replace(t, engine_kwargs={**t.engine_kwargs, **engine_kwargs})
