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
"""

from __future__ import annotations

import torch

from splitserve.kernels import reference
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


register("cpu", "linear", linear)
