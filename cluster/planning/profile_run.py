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
    speculative: object = None  # the config's SpeculativeSpec, if it speculates


def spec_methods(target: ProfileTarget, speculation: bool | None, draft: str | None = None,
                 k: int | None = None) -> list:
    """The speculation methods to measure acceptance for (spec_probe.SpecMethod):
    the config's own method when it speculates (unless ``speculation`` is
    False); with ``speculation`` True and no such section, n-gram lookup and
    a draft model (``draft``, else the shipped draft for the default model)."""
    from splitserve.cluster.planning.spec_probe import SpecMethod
    from splitserve.engine.default_model import (
        DEFAULT_DRAFT_NAME, DEFAULT_MODEL_NAME, default_draft_path, default_model_path)

    def draft_method(path: str, kk: int) -> SpecMethod:
        return SpecMethod("draft", kk, path,
                          shape_from_config_json(path, Path(path).name).key)

    sp = target.speculative
    if speculation is False or (sp is None and not speculation):
        return []
    if sp is not None:
        kk = k or sp.num_speculative_tokens
        if sp.method == "draft":
            from splitserve.engine.hub import resolve_checkpoint

            return [draft_method(str(resolve_checkpoint(sp.draft_model, sp.draft_revision)), kk)]
        return [SpecMethod("ngram", kk, ngram_min=sp.ngram_min, ngram_max=sp.ngram_max)]
    kk = k or 4
    out = [SpecMethod("ngram", kk)]
    if draft:
        out.append(draft_method(draft, kk))
    elif target.shape.key == shape_from_config_json(default_model_path(),
                                                    DEFAULT_MODEL_NAME).key:
        out.append(SpecMethod("draft", kk, str(default_draft_path()), shape_from_config_json(
            default_draft_path(), DEFAULT_DRAFT_NAME).key))
    return out


def _settings(engine, kv_cache_dtype: str, device: str, threads: int) -> EngineSettings:
    from splitserve.kernels.dispatch import backend_for

    dtype = str(engine.dtype).removeprefix("torch.")
    kv = "fp8" if kv_cache_dtype == "fp8" else dtype
    if getattr(engine.cfg, "weight_dtype", "auto") == "fp8":
        dtype = "fp8"  # fp8 weights' rows, as sim.options.engine_settings looks them up
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
                                     shape_from_config_json(path, spec.name), spec.speculative))
        return out
    path = model_dir or str(default_model_path())
    name = Path(path).name
    kw = dict(model=path, model_id=name, dtype=dtype, device=device)
    return [ProfileTarget(name, path, kw, EngineSettings(), shape_from_config_json(path, name))]


def run(db: ProfileDB, target: ProfileTarget, fast: bool = False, quality: bool = True,
        handoff: bool = False, threads: int | None = None,
        log: Callable[[str], None] = print, speculation: bool | None = None,
        spec_draft: str | None = None, spec_k: int | None = None,
        spec_text: str | None = None) -> dict:
    """Measure ``target`` on this machine and write every row; returns a
    summary. Speculation acceptance (``spec_probe``) is measured for the
    methods ``spec_methods`` names: by default only when the target's config
    speculates."""
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
    methods = spec_methods(target, speculation, spec_draft, spec_k)
    if methods:
        from splitserve.cluster.planning import spec_probe

        rows = spec_probe.run(db, shape, target.engine_kwargs, methods,
                              Path(spec_text) if spec_text else profiler.HELDOUT_PATH,
                              fast=fast, log=log, plain=engine)
        summary["speculation"] = [
            {"method": r.method, "draft": r.draft, "workload": r.workload, "k": r.k,
             "acceptance": r.acceptance, "acceptance_rate": r.acceptance_rate,
             "mean_accepted_length": r.mean_accepted_length,
             "tokens_per_step": r.tokens_per_step} for r in rows]
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
