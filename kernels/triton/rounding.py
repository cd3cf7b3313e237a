"""Rounding a float32 value to a 16-bit dtype inside a kernel, exactly as torch rounds.

Kernels that reproduce a reference's intermediate roundings (RMSNorm's
normed row, rotary's products) keep the value in float32 but rounded to
the tensor's dtype. For bfloat16 this is done on the bits, round to
nearest even: the GPU's own conversion rounds the same way, but Triton's
CPU interpreter (``TRITON_INTERPRET=1``, how the kernels are tested)
does not, and a test there should see the rounding the GPU does. float16
and float32 use the plain conversion, which both round to nearest even.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_as(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (round to nearest even), as float32.
    Finite values only: the tensors it sees hold no NaN."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x
