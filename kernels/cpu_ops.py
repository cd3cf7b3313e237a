"""CPU variants of ops whose fastest form on the CPU math libraries is not
the reference's. Registered as backend ``cpu``; every other op runs the
reference.

``linear`` (float32): with MKL on x86, ``x @ weight^T`` for a few rows
repacks the whole weight on every call; ``weight @ x^T`` does not, and computes the
same sums. Measured on 2-core AVX2 (fp32, 1-128 rows):

- large weights (>= ``LARGE_ELEMENTS``, e.g. a 1B model's projections):
  1.4-3x faster at 2-16 rows, 1.1-1.3x at 33-64, even at 96-128;
- tall weights (out >= ``TALL_RATIO`` x in, a vocabulary projection):
  1.3-4x faster at 1-48 rows, with a single row computed as two (a matrix
  product instead of a matrix-vector one, which is the slow path there);
- a single row of any other weight, and small square-ish weights: no
  faster or slower, so the reference runs.
Odd row counts are padded to even ones, which take the faster kernels.

``paged_attention``: short queries (a verify step's k + 1 tokens) batched, in
``cpu_attention``.

``fp8_w8a16_linear`` (float32 activations): the fp8 weight is widened to
float32 for the one call and multiplied by ``linear`` above; the weight
stays fp8 in memory between calls (the float32 copy lives for one matmul).
Per-tensor and per-channel scales multiply the [M, N] output instead of
the [N, K] weight (one pass over the weight fewer); block scales expand
over the weight. Widening goes through a 256-entry table (``index_select``
on the bytes: about 2x faster than torch's own e4m3 cast on a 2-vCPU Xeon),
but still costs more than reading a float32 weight: the CPU path saves
memory, not time.
"""

from __future__ import annotations

import torch

from splitserve.kernels import cpu_attention, fp8_gemm, reference
from splitserve.kernels.dispatch import register

TALL_RATIO = 8  # out_features >= TALL_RATIO * in_features
LARGE_ELEMENTS = 4 << 20  # out_features * in_features
MAX_ROWS = 64


def _weight_first(weight: torch.Tensor, m: int) -> bool:
    n, k = weight.shape
    tall = n >= TALL_RATIO * k
    if m == 1:
        return tall
    return m <= MAX_ROWS and (tall or n * k >= LARGE_ELEMENTS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (x.dim() != 2 or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not _weight_first(weight, x.shape[0])):  # measured for float32 only
        return reference.linear(x, weight, bias)
    m = x.shape[0]
    if m % 2:
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
    out = torch.mm(weight, x.t())[:, :m].t().contiguous()
    if bias is not None:
        out += bias
    return out


_E4M3_TABLE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def widen_fp8(w8: torch.Tensor) -> torch.Tensor:
    """e4m3fn -> float32, exactly, by table lookup on the bytes."""
    codes = w8.reshape(-1).view(torch.uint8).int()
    return _E4M3_TABLE.index_select(0, codes).view(w8.shape)


def fp8_w8a16_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     group_n: int, group_k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    n, k = weight.shape
    if x.dtype != torch.float32 or x.dim() != 2:
        return fp8_gemm.fp8_w8a16_linear(x, weight, weight_scale, group_n, group_k, bias)
    if group_k < k:  # scales vary along K: on the weight
        w = fp8_gemm.dequantize_weight(weight, weight_scale, group_n, group_k)
        return linear(x, w, None if bias is None else bias.float())
    out = linear(x, widen_fp8(weight))  # [M, N]
    out *= weight_scale.reshape(-1).repeat_interleave(group_n)[:n] if group_n < n else weight_scale.reshape(())
    if bias is not None:
        out += bias
    return out


register("cpu", "linear", linear)
register("cpu", "fp8_w8a16_linear", fp8_w8a16_linear)
register("cpu", "paged_attention", cpu_attention.paged_attention)
