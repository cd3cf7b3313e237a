"""MXFP4 weights, as the released gpt-oss checkpoints store their experts
(``quantization_config`` quant_method ``mxfp4``), dequantized at load.

Each weight row is cut into groups of 32 values along its input dim; a
group is 16 bytes of ``*_blocks`` (two FP4 e2m1 codes a byte, the low
nibble first) and one byte of ``*_scales`` (an e8m0 exponent, bias 127).
Value = FP4 code's value * 2 ** (scale - 127): exact in float32 and
bfloat16, so the dequantized model is the checkpoint's, as transformers'
``convert_moe_packed_tensors`` dequantizes it.
"""

from __future__ import annotations

import torch

from splitserve.engine.errors import CheckpointError

# e2m1 code -> value (sign bit 3)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, name: str) -> torch.Tensor:
    """blocks [..., G, 16] uint8 and scales [..., G] uint8 -> [..., G * 32]
    float32 (``name``: the weight's, for errors)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointError(f"MXFP4 weight {name!r}: blocks and scales must be uint8, got "
                              f"{blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise CheckpointError(f"MXFP4 weight {name!r}: blocks {list(blocks.shape)} and scales "
                              f"{list(scales.shape)} do not fit [..., G, 16] and [..., G]")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., G, 16, 2]
    values = lut[codes].flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2)
