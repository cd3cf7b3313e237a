"""Registers the Triton kernels as kernel backend "triton".

Importing this module imports triton; an ImportError propagates so that
``splitserve.kernels.dispatch`` reports the backend unavailable and falls back to the
reference ops.
"""

from __future__ import annotations

import triton  # noqa: F401  (fail here, not halfway through registration)

from splitserve.kernels import dispatch
from splitserve.kernels.triton.activation import gelu_tanh_and_mul, silu_and_mul
from splitserve.kernels.triton.decode_attention import paged_decode_attention
from splitserve.kernels.triton.fp8_gemm import fp8_w8a8_linear, fp8_w8a16_linear
from splitserve.kernels.triton.fused_moe import fp8_fused_moe, fused_moe
from splitserve.kernels.triton.recurrent import gated_delta_step, selective_scan_step, ssm_scan_step
from splitserve.kernels.triton.kv_pack import pack_kv, unpack_kv
from splitserve.kernels.triton.kv_store import store_kv
from splitserve.kernels.triton.lora import lora_expand, lora_shrink
from splitserve.kernels.triton.prefill_attention import paged_attention
from splitserve.kernels.triton.rmsnorm import rms_norm
from splitserve.kernels.triton.rope import rotary_embedding

OPS = {
    "rms_norm": rms_norm,
    "rotary_embedding": rotary_embedding,
    "silu_and_mul": silu_and_mul,
    "gelu_tanh_and_mul": gelu_tanh_and_mul,
    "store_kv": store_kv,
    "paged_attention": paged_attention,
    "paged_decode_attention": paged_decode_attention,
    "pack_kv": pack_kv,
    "unpack_kv": unpack_kv,
    "fused_moe": fused_moe,
    "fp8_w8a16_linear": fp8_w8a16_linear,
    "fp8_w8a8_linear": fp8_w8a8_linear,
    "fp8_fused_moe": fp8_fused_moe,
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
    "gated_delta_step": gated_delta_step,
    "ssm_scan_step": ssm_scan_step,
    "selective_scan_step": selective_scan_step,
}

for _name, _fn in OPS.items():
    dispatch.register("triton", _name, _fn)
