"""The ops the engine calls: each dispatches on its first tensor's device.

Signatures and semantics are those of ``splitserve.kernels.reference``
(``splitserve.kernels.fp8_gemm`` for the fp8-weight ops, ``splitserve.kernels.lora``
for batched LoRA, ``splitserve.kernels.recurrent`` for the recurrent layers).
"""

from __future__ import annotations

from splitserve.kernels.dispatch import get_op


def linear(x, weight, bias=None):
    return get_op("linear", x.device)(x, weight, bias)


def rms_norm(x, weight, eps, residual=None, fp32_product=False):
    return get_op("rms_norm", x.device)(x, weight, eps, residual, fp32_product)


def rotary_embedding(positions, q, k, cos_sin_cache):
    return get_op("rotary_embedding", q.device)(positions, q, k, cos_sin_cache)


def silu_and_mul(x):
    return get_op("silu_and_mul", x.device)(x)


def gelu_tanh_and_mul(x):
    return get_op("gelu_tanh_and_mul", x.device)(x)


def store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    return get_op("store_kv", key.device)(
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale
    )


def paged_attention(q, k_cache, v_cache, block_tables, cu_query_lens, context_lens,
                    scale, k_scale=1.0, v_scale=1.0, sliding_window=0, softcap=0.0, sinks=None,
                    alibi_slopes=None):
    return get_op("paged_attention", q.device)(
        q, k_cache, v_cache, block_tables, cu_query_lens, context_lens, scale, k_scale, v_scale,
        sliding_window, softcap, sinks=sinks, alibi_slopes=alibi_slopes,
    )


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                           k_scale=1.0, v_scale=1.0, sliding_window=0, softcap=0.0, sinks=None,
                           alibi_slopes=None):
    return get_op("paged_decode_attention", q.device)(
        q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale, sliding_window,
        softcap, sinks=sinks, alibi_slopes=alibi_slopes,
    )


def pack_kv(kv_cache, block_ids, layer_start, layer_end):
    return get_op("pack_kv", kv_cache.device)(kv_cache, block_ids, layer_start, layer_end)


def unpack_kv(buf, kv_cache, block_ids, layer_start):
    return get_op("unpack_kv", kv_cache.device)(buf, kv_cache, block_ids, layer_start)


def fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids):
    return get_op("fused_moe", x.device)(x, w_gate_up, w_down, topk_weights, topk_ids)


def fp8_w8a16_linear(x, weight, weight_scale, group_n, group_k, bias=None):
    return get_op("fp8_w8a16_linear", x.device)(x, weight, weight_scale, group_n, group_k, bias)


def fp8_w8a8_linear(x, weight, weight_scale, group_n, group_k, bias=None):
    return get_op("fp8_w8a8_linear", x.device)(x, weight, weight_scale, group_n, group_k, bias)


def fp8_fused_moe(x, w_gate_up, gate_up_scale, gate_up_groups, w_down, down_scale, down_groups,
                  topk_weights, topk_ids):
    return get_op("fp8_fused_moe", x.device)(x, w_gate_up, gate_up_scale, gate_up_groups, w_down,
                                             down_scale, down_groups, topk_weights, topk_ids)


def lora_shrink(x, lora_a, meta):
    return get_op("lora_shrink", x.device)(x, lora_a, meta)


def lora_expand(y, h, lora_b, meta, slice_offsets):
    return get_op("lora_expand", y.device)(y, h, lora_b, meta, slice_offsets)


def gated_delta_step(q, k, v, g, beta, state, slots):
    return get_op("gated_delta_step", q.device)(q, k, v, g, beta, state, slots)


def ssm_scan_step(x, dt, A, B, C, D, state, slots):
    return get_op("ssm_scan_step", x.device)(x, dt, A, B, C, D, state, slots)


def selective_scan_step(u, dt, A, B, C, state, slots):
    return get_op("selective_scan_step", u.device)(u, dt, A, B, C, state, slots)
