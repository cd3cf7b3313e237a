"""FP8 (e4m3fn) KV-cache helpers, torch only.

A cache stored in ``torch.float8_e4m3fn`` holds ``value / scale`` with one
scale per tensor (``k_scale`` for keys, ``v_scale`` for values, per model);
readers multiply by the scale. ``compute_kv_scale`` picks the scale that
maps the largest magnitude onto e4m3's largest finite value (448).

How fp8 KV accuracy is checked
------------------------------
Two separate errors, checked separately so neither hides the other:

1. Quantization (``store_kv``): every stored byte must equal
   ``(x / scale).to(torch.float8_e4m3fn)`` exactly (round to nearest even,
   saturating at +-448). Relative to the input, the round trip
   ``dequantize_kv(quantize_kv(x, s), s)`` is then within
   ``kv_quantization_error_bound(x, s)``: half an e4m3 step, i.e.
   ``|x| * 2^-4`` for normal values and ``s * 2^-10`` in the subnormal range.
2. Attention over an fp8 cache: kernels are compared against the torch
   reference fed *the same* fp8 cache and scales, so the comparison measures
   only the kernel's own arithmetic and uses the tolerances of the query
   dtype, not fp8's.

End-to-end drift (fp8 cache vs a bf16 cache for the same model) is a model
quality property, not a kernel one; it is bounded per element by (1).
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
_E4M3_HALF_STEP_REL = 2.0**-4  # 3 mantissa bits: half a step is 2^-4 of the binade
_E4M3_SUBNORMAL_HALF_STEP = 2.0**-10  # subnormal step is 2^-9


def compute_kv_scale(tensor: torch.Tensor) -> float:
    """Per-tensor scale ``amax / 448`` for storing ``tensor`` in e4m3fn.

    An all-zero (or empty) tensor gets 1.0 so the scale is always usable.
    Non-finite values are rejected: they would make every stored value 0.
    """
    if tensor.numel() == 0:
        return 1.0
    amax = float(tensor.detach().abs().max().float())
    if amax != amax or amax == float("inf"):
        raise ValueError("compute_kv_scale: tensor holds inf or NaN; cannot pick an fp8 scale")
    return amax / E4M3_MAX if amax > 0 else 1.0


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` as e4m3fn, saturating at +-448 (what store_kv writes)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x8: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3fn cache contents back to values: ``x8 * scale`` in ``dtype``."""
    return (x8.float() * scale).to(dtype)


def kv_quantization_error_bound(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-element bound on ``|x - dequantize_kv(quantize_kv(x, scale), scale)|``
    for ``|x| <= 448 * scale`` (half an e4m3 step, normal or subnormal)."""
    xf = x.float().abs()
    return torch.maximum(xf * _E4M3_HALF_STEP_REL, torch.full_like(xf, scale * _E4M3_SUBNORMAL_HALF_STEP))
