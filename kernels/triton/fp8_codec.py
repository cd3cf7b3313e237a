"""float8 e4m3fn (OCP "e4m3fn": bias 7, max 448, no infinities) encode and
decode as integer bit arithmetic, shared by the KV-cache kernels.

Why not ``x.to(tl.float8e4nv)``: native fp8 conversion needs sm_89+, and
Triton's CPU interpreter truncates instead of rounding and does not
saturate. The bit arithmetic below is exact round-to-nearest-even with
saturation at +-448 -- the same bytes ``torch.Tensor.to(torch.float8_e4m3fn)``
produces -- on every GPU and in the interpreter, so the tested code path is
the shipped one. Caches reach the kernels as their uint8 bytes.
"""

import triton
import triton.language as tl


@triton.jit
def encode_e4m3(v):
    """v: fp32 values already divided by the scale -> uint8 e4m3fn codes."""
    a = tl.minimum(tl.abs(v), 448.0)
    bits = a.to(tl.uint32, bitcast=True)
    # Normal range [2^-6, 448]: round the 23-bit mantissa to 3 bits, half to
    # even (carries roll into the exponent), then rebias 127 -> 7.
    rounded = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = (rounded >> 20) - (120 << 3)
    # Subnormals are multiples of 2^-9: adding 2^14 makes the fp32 adder
    # round to exactly that grid; the mantissa then holds the code (0..8).
    sub = (a + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
    code = tl.where(a >= 0.015625, normal, sub)
    sign = (v.to(tl.uint32, bitcast=True) >> 24) & 0x80
    return (code | sign).to(tl.uint8)


@triton.jit
def decode_e4m3(codes, scale):
    """codes: uint8 e4m3fn -> fp32 ``value * scale``.

    Shifting the 7 magnitude bits into a float16 gives value * 2^-8 for
    normals and subnormals alike (the formats' subnormal grids line up), so
    the 2^8 is folded into the scale: exact, as it is a power of two.
    """
    c = codes.to(tl.uint16)
    h = ((c & 0x7F) << 7) | ((c & 0x80) << 8)
    return h.to(tl.float16, bitcast=True).to(tl.float32) * (scale * 256.0)
