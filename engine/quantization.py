"""Quantized checkpoints: which load, and where each fp8 weight's scales go.

Formats read (``quantization_config`` in config.json):

- ``quant_method: "fp8"``: transformers' fine-grained FP8 (DeepSeek-V3,
  Qwen3-FP8: ``weight_block_size: [128, 128]``, one ``weight_scale_inv`` per
  128x128 block) and per-tensor FP8 (no block size; one ``weight_scale_inv``
  or, as AutoFP8 writes it, ``weight_scale`` per tensor).
- ``quant_method: "compressed-tensors"`` with ``format: "float-quantized"``
  (llm-compressor's FP8 and FP8-dynamic): symmetric 8-bit float weights, one
  ``weight_scale`` per tensor, per output channel, per block or per group.

Every scale multiplies: ``w = w8 * scale``. Activations are quantized
dynamically, per token, at run time. Static activation scales
(``activation_scheme: static``: ``input_scale`` / ``activation_scale``
tensors) are read past: dynamic per-token scales are at least as fine, so
the model runs as its dynamic twin would. Everything else (GPTQ, AWQ,
bitsandbytes, integer or 4-bit formats, asymmetric or e5m2 weights, a
quantized KV cache scheme) is refused with what was found.

Which tensors are fp8 is read from the weight files' headers
(``scan_fp8_weights``), not inferred from ignore lists, whose spelling
differs by tool (substrings, regexes, module classes): a layer is fp8 if
its checkpoint tensor is. The scale groups of each tensor follow from its
scale's shape (``checkpoint_groups``). Projections the engine fuses (q/k/v,
gate/up) share one scale layout (``fused_groups``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from safetensors import SafetensorError, safe_open

from splitserve.engine.errors import CheckpointError
from splitserve.kernels.fp8_gemm import scale_shape

Groups = tuple[int, int]  # (group_n, group_k) of a weight's scales: splitserve.kernels.fp8_gemm

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
# static activation scales, and per-tensor activation / KV scales some exporters add
UNUSED_SUFFIXES = ("input_scale", "activation_scale")
_FP8_HEADER_DTYPE = "F8_E4M3"


@dataclass(frozen=True)
class Fp8Weight:
    """One fp8 tensor of a checkpoint: its scale groups and its scale's name."""

    groups: Groups
    scale_name: str
    shape: tuple[int, ...] = ()  # the weight's, [out, in]


@dataclass(frozen=True)
class QuantizationConfig:
    """A checkpoint's ``quantization_config``, and (after ``scan_fp8_weights``)
    its fp8 tensors by checkpoint name."""

    method: str  # "fp8" | "compressed-tensors"
    activation_scheme: str  # "dynamic" | "static" (run as dynamic)
    weight_block_size: Groups | None = None  # 128x128 blocks
    group_size: int | None = None  # compressed-tensors "group" strategy
    weights: Mapping[str, Fp8Weight] = field(default_factory=dict)  # "....q_proj.weight" -> ...
    unused: frozenset[str] = frozenset()  # tensors read past (static activation scales)


def parse_quantization_config(cfg: dict[str, Any], source: str) -> QuantizationConfig | None:
    """The ``quantization_config`` of a config.json, checked; None when absent."""
    q = cfg.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: quantization_config must be an object, got {q!r}")
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8":
        return _parse_hf_fp8(q, source)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(q, source)
    raise CheckpointError(
        f"{source}: quantized checkpoint (quant_method {method or None!r}) is not supported; "
        "supported: fp8 and compressed-tensors float8 checkpoints, or unquantized ones "
        "(weight_dtype: fp8 quantizes those at load)")


def _block(value: Any, source: str) -> Groups | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise CheckpointError(f"{source}: weight_block_size must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _parse_hf_fp8(q: dict[str, Any], source: str) -> QuantizationConfig:
    scheme = str(q.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise CheckpointError(f"{source}: fp8 activation_scheme {scheme!r} is not supported")
    if str(q.get("scale_fmt", "float")) != "float":
        raise CheckpointError(f"{source}: fp8 scale_fmt {q.get('scale_fmt')!r} is not supported; "
                              "supported: float32 scales")
    if str(q.get("expert_dtype", "fp8")) != "fp8":
        raise CheckpointError(f"{source}: fp8 expert_dtype {q.get('expert_dtype')!r} is not supported")
    return QuantizationConfig("fp8", scheme, _block(q.get("weight_block_size"), source))


def _parse_compressed_tensors(q: dict[str, Any], source: str) -> QuantizationConfig:
    fmt = q.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise CheckpointError(f"{source}: compressed-tensors format {fmt!r} is not supported; "
                              "supported: float-quantized (fp8 weights)")
    if q.get("kv_cache_scheme"):
        raise CheckpointError(f"{source}: compressed-tensors kv_cache_scheme is not supported; "
                              "serve the checkpoint's weights with kv_cache_dtype: fp8 instead")
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{source}: compressed-tensors config has no config_groups")
    schemes, block, group_size = set(), None, None
    for name, group in groups.items():
        w = (group or {}).get("weights") or {}
        where = f"{source}: compressed-tensors config_groups.{name}.weights"
        if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
            raise CheckpointError(f"{where}: {w.get('num_bits')}-bit {w.get('type')!r} weights are not "
                                  "supported; supported: 8-bit float (fp8 e4m3)")
        if not w.get("symmetric", True):
            raise CheckpointError(f"{where}: asymmetric (zero-point) weights are not supported")
        if w.get("dynamic"):
            raise CheckpointError(f"{where}: dynamic weight scales are not supported")
        strategy = w.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block", "group"):
            raise CheckpointError(f"{where}: strategy {strategy!r} is not supported; supported: "
                                  "tensor, channel, block, group")
        if strategy == "block":
            block = _block(w.get("block_structure"), where)
        if strategy == "group":
            group_size = int(w.get("group_size") or 0) or None
        acts = (group or {}).get("input_activations") or {}
        if acts and (acts.get("type") != "float" or int(acts.get("num_bits", 8)) != 8):
            raise CheckpointError(f"{source}: compressed-tensors config_groups.{name}.input_activations: "
                                  f"{acts.get('num_bits')}-bit {acts.get('type')!r} activations are "
                                  "not supported; supported: fp8, or none")
        schemes.add("static" if acts and not acts.get("dynamic", True) else "dynamic")
    return QuantizationConfig("compressed-tensors", "static" if "static" in schemes else "dynamic",
                              weight_block_size=block, group_size=group_size)


def checkpoint_groups(name: str, weight_shape: list[int], scale_shape_: list[int],
                      cfg: QuantizationConfig) -> Groups:
    """The (group_n, group_k) of checkpoint tensor ``name`` from its scale's shape."""
    if len(weight_shape) != 2:
        raise CheckpointError(f"fp8 tensor {name!r} has shape {weight_shape}; fp8 is read for "
                              "2-D projection weights only")
    n, k = weight_shape
    numel = 1
    for d in scale_shape_:
        numel *= d
    if numel == 1:
        return n, k  # per-tensor
    if list(scale_shape_) in ([n], [n, 1]):
        return 1, k  # per-channel
    if len(scale_shape_) == 2:
        if cfg.weight_block_size and tuple(scale_shape_) == scale_shape(n, k, *cfg.weight_block_size):
            return cfg.weight_block_size
        g = cfg.group_size or (k // scale_shape_[1] if scale_shape_[1] and k % scale_shape_[1] == 0 else 0)
        if g and tuple(scale_shape_) == scale_shape(n, k, 1, g):
            return 1, g
    raise CheckpointError(f"fp8 tensor {name!r} [{n}, {k}] has a scale of shape {list(scale_shape_)}, "
                          "which is none of: one per tensor, per output channel, per "
                          f"{cfg.weight_block_size or 'weight_block_size'} block, per group")


def scan_fp8_weights(files: Iterable[Path], cfg: QuantizationConfig) -> QuantizationConfig:
    """``cfg`` with ``weights`` (every fp8 tensor and its scale groups) and
    ``unused`` filled from the weight files' headers; reads no tensor data."""
    dtypes: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    dtypes[name], shapes[name] = s.get_dtype(), list(s.get_shape())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from None
    weights: dict[str, Fp8Weight] = {}
    for name, dtype in dtypes.items():
        if dtype.startswith("F8_") and dtype != _FP8_HEADER_DTYPE:
            raise CheckpointError(f"tensor {name!r} is {dtype}; fp8 weights must be e4m3 (F8_E4M3)")
        if dtype != _FP8_HEADER_DTYPE:
            continue
        if not name.endswith(".weight"):
            raise CheckpointError(f"fp8 tensor {name!r} is not a weight; only projection weights "
                                  "are read in fp8")
        base = name.removesuffix("weight")
        scale = next((base + s for s in SCALE_SUFFIXES if base + s in dtypes), None)
        if scale is None:
            raise CheckpointError(f"fp8 tensor {name!r} has no scale ({base}weight_scale_inv or "
                                  f"{base}weight_scale)")
        weights[name] = Fp8Weight(checkpoint_groups(name, shapes[name], shapes[scale], cfg), scale,
                                  tuple(shapes[name]))
    if not weights:
        raise CheckpointError(f"quantization_config says {cfg.method}, but no tensor is stored in "
                              "float8_e4m3fn")
    unused = frozenset(n for n in dtypes if n.endswith(UNUSED_SUFFIXES))
    return dataclasses.replace(cfg, weights=weights, unused=unused)


def fused_groups(parts: list[tuple[str, int, Fp8Weight | None]], k: int) -> Groups | None:
    """The scale groups of one weight fused from checkpoint tensors ``parts``
    ((name, rows, fp8 info or None), in row order), all [rows, k]; None when
    none is fp8.

    Shards keep their checkpoint groups when those line up across the
    shards (same groups, every shard boundary on a group boundary, e.g.
    128-row blocks of q/k/v sizes that are multiples of 128, or per-tensor
    scales of gate and up, which have the same size); otherwise the fused
    scale has one row per output row (group_n = 1), which holds any of them
    exactly: a per-tensor scale becomes per-channel, a block scale is
    repeated over its rows."""
    infos = [info for _, _, info in parts]
    if all(i is None for i in infos):
        return None
    if any(i is None for i in infos):
        fp8 = [n for n, _, i in parts if i is not None]
        other = [n for n, _, i in parts if i is None]
        raise CheckpointError(f"tensors {fp8} are fp8 but {other}, fused with them into one "
                              "projection, are not; quantize all or none of them")
    gks = {min(i.groups[1], k) for i in infos}
    if len(gks) > 1:
        raise CheckpointError(f"tensors {[n for n, _, _ in parts]} are fused into one projection but "
                              f"their fp8 scales group the inputs differently ({sorted(gks)})")
    gk = gks.pop()
    gns = {min(i.groups[0], rows) for (_, rows, i) in parts}
    if len(gns) == 1:
        gn, start = gns.pop(), 0
        aligned = True
        for _, rows, _ in parts[:-1]:
            start += rows
            aligned &= start % gn == 0
        if aligned:
            return gn, gk
    return 1, gk


def layer_groups(quant: QuantizationConfig | None, shards: list[tuple[str, int]], k: int) -> Groups | None:
    """``fused_groups`` for checkpoint weights ``shards`` ((name, rows)) of a model."""
    if quant is None:
        return None
    return fused_groups([(n, rows, quant.weights.get(n)) for n, rows in shards], k)
