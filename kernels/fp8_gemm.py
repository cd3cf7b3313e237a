"""FP8 (e4m3fn) weights: quantization, scale layouts and the torch reference GEMMs.

Scale layout
------------
An fp8 weight ``w8`` [N, K] (``torch.float8_e4m3fn``) comes with a float32
``weight_scale`` [ceil(N / group_n), ceil(K / group_k)]; the weight it
stands for is ``w[n, k] = w8[n, k] * weight_scale[n // group_n, k // group_k]``.
One layout covers every scheme checkpoints use:

- per-tensor: (group_n, group_k) = (N, K), scale [1, 1];
- per-channel: (1, K), scale [N, 1];
- 128x128 blocks (DeepSeek-V3, Qwen3-FP8): (128, 128);
- groups along K (compressed-tensors ``group``): (1, g).

Ops (the contracts ``splitserve.kernels.dispatch`` registers kernels under)
---------------------------------------------------------------------------
- ``fp8_w8a16_linear``: weight-only fp8. The weight is dequantized, the
  activations stay in their dtype; float32 math, output in x.dtype.
- ``fp8_w8a8_linear``: fp8 x fp8. Each activation row is quantized to e4m3
  with its own dynamic scale (``quantize_per_token``), then multiplied by
  the fp8 weight; float32 math, output in x.dtype. GPUs with FP8 tensor
  cores (sm_89 and later) run this; others, and the CPU, run w8a16.
- ``fp8_fused_moe``: ``reference.fused_moe`` with fp8 expert weights
  (weight-only; each chosen expert dequantized as it runs).

Accuracy bounds
---------------
Quantization (checked per element by the tests): with the scale mapping a
group's largest magnitude to 448, e4m3 rounding moves a value by at most
half a step: ``|x| * 2^-4`` for normal values and ``scale * 2^-10`` in the
subnormal range (``rounding_bound``). A product's error against the
unquantized matmul is then bounded term by term (``w8a16_error_bound``,
``w8a8_error_bound``): ``sum_k e_x |w| + |x| e_w + e_x e_w``.

Kernel against reference (the same fp8 bytes and scales on both sides): the
products are exact in float32 and only the order of the float32 sums and the
final rounding to the output dtype differ, so
``|kernel - reference| <= K * 2^-23 * sum_k |x~_k w~_k| + ulp(out dtype) * |reference|``
(``gemm_rounding_bound``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.fp8 import E4M3_MAX, kv_quantization_error_bound

FP8_WEIGHT_DTYPE = torch.float8_e4m3fn
MIN_ACTIVATION_SCALE = 1e-12  # an all-zero row gets this scale (and zero codes)
_FP32_EPS = 2.0**-23
_HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def scale_shape(n: int, k: int, group_n: int, group_k: int) -> tuple[int, int]:
    """The weight_scale shape of an [n, k] weight in groups of (group_n, group_k)."""
    return -(-n // group_n), -(-k // group_k)


def expand_scale(scale: torch.Tensor, n: int, k: int, group_n: int, group_k: int) -> torch.Tensor:
    """weight_scale [ceil(n/gn), ceil(k/gk)] -> one scale per weight element: [n, k]."""
    return scale.repeat_interleave(group_n, 0)[:n].repeat_interleave(group_k, 1)[:, :k]


def quantize_weight(w: torch.Tensor, group_n: int, group_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (w8 [N, K] e4m3fn, weight_scale float32).

    Each group's scale maps its largest magnitude onto 448 (an all-zero
    group gets 1.0); values round to nearest even."""
    n, k = w.shape
    sn, sk = scale_shape(n, k, group_n, group_k)
    wf = w.float()
    padded = F.pad(wf.abs(), (0, sk * group_k - k, 0, sn * group_n - n))
    amax = padded.view(sn, group_n, sk, group_k).amax(dim=(1, 3))  # [sn, sk]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    w8 = (wf / expand_scale(scale, n, k, group_n, group_k)).clamp(-E4M3_MAX, E4M3_MAX)
    return w8.to(FP8_WEIGHT_DTYPE), scale


def dequantize_weight(w8: torch.Tensor, scale: torch.Tensor, group_n: int, group_k: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w8 [N, K] e4m3fn and its weight_scale -> the weight [N, K] in ``dtype``
    (the product in float32, then rounded to ``dtype``)."""
    n, k = w8.shape
    if group_n >= n and group_k >= k:  # per-tensor: a scalar multiply
        return (w8.float() * scale.reshape(-1)[0].float()).to(dtype)
    if group_k >= k:  # per-channel (or rows in groups): one scale per row
        rows = scale.float().reshape(-1).repeat_interleave(group_n)[:n]
        return (w8.float() * rows[:, None]).to(dtype)
    return (w8.float() * expand_scale(scale.float(), n, k, group_n, group_k)).to(dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] e4m3fn, scale [M] float32): each row divided by
    its own scale amax / 448 (at least MIN_ACTIVATION_SCALE), rounded to
    nearest even, saturating; ``x8 * scale`` approximates x."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    scale = torch.clamp(amax / E4M3_MAX, min=MIN_ACTIVATION_SCALE)
    x8 = (xf / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_WEIGHT_DTYPE)
    return x8, scale


def fp8_w8a16_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_n: int,
                     group_k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float, weight [N, K] e4m3fn, weight_scale as in the module
    docstring -> x @ dequantized(weight)^T (+ bias) [M, N] in x.dtype, computed
    in float32."""
    w = dequantize_weight(weight, weight_scale, group_n, group_k)
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


def fp8_w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_n: int,
                    group_k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As ``fp8_w8a16_linear`` with x first quantized per token
    (``quantize_per_token``): (x8 * x_scale) @ dequantized(weight)^T (+ bias)."""
    x8, xs = quantize_per_token(x)
    xq = x8.float() * xs[:, None]
    w = dequantize_weight(weight, weight_scale, group_n, group_k)
    out = F.linear(xq, w, None if bias is None else bias.float())
    return out.to(x.dtype)


def fp8_fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    gate_up_scale: torch.Tensor,
    gate_up_groups: tuple[int, int],
    w_down: torch.Tensor,
    down_scale: torch.Tensor,
    down_groups: tuple[int, int],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``reference.fused_moe`` with fp8 experts (weight-only).

    w_gate_up [E, 2I, H] e4m3fn with gate_up_scale [E, ceil(2I/gn), ceil(H/gk)]
    for gate_up_groups (gn, gk), as for a linear weight; w_down [E, H, I]
    e4m3fn with down_scale for down_groups likewise. Each expert a token
    chose is dequantized to x.dtype when it runs, then computed as
    ``reference.fused_moe`` computes it."""
    from splitserve.kernels.reference import routed_experts, silu_and_mul

    def expert(e: int, xs: torch.Tensor) -> torch.Tensor:  # xs [n, H] -> [n, H]
        gu = dequantize_weight(w_gate_up[e], gate_up_scale[e], *gate_up_groups, x.dtype)
        down = dequantize_weight(w_down[e], down_scale[e], *down_groups, x.dtype)
        return F.linear(silu_and_mul(F.linear(xs, gu)), down)

    return routed_experts(x, topk_weights, topk_ids, w_gate_up.shape[0], expert)


# -- accuracy bounds (used by the tests; see the module docstring) -------------------

def rounding_bound(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Per element: the most e4m3 rounding with ``scale`` can move ``x``
    (``scale`` broadcasts against x)."""
    if isinstance(scale, torch.Tensor):
        xf = x.float().abs()
        return torch.maximum(xf * 2.0**-4, scale.float() * 2.0**-10)
    return kv_quantization_error_bound(x, scale)


def weight_rounding_bound(w: torch.Tensor, group_n: int, group_k: int) -> torch.Tensor:
    """[N, K]: per element, the most ``quantize_weight(w, group_n, group_k)`` moves w."""
    _, scale = quantize_weight(w, group_n, group_k)
    n, k = w.shape
    return rounding_bound(w, expand_scale(scale, n, k, group_n, group_k))


def w8a16_error_bound(x: torch.Tensor, w: torch.Tensor, group_n: int, group_k: int) -> torch.Tensor:
    """[M, N]: how far ``fp8_w8a16_linear`` on quantize_weight(w) may land from
    x @ w^T, from weight rounding alone (plus float32 summation slack)."""
    ew = weight_rounding_bound(w, group_n, group_k)
    xa = x.float().abs()
    return xa @ ew.T + gemm_rounding_bound(xa, w.float().abs() + ew, torch.float32)


def w8a8_error_bound(x: torch.Tensor, w: torch.Tensor, group_n: int, group_k: int) -> torch.Tensor:
    """[M, N]: as ``w8a16_error_bound`` with the activations rounded per token too:
    sum_k e_x |w| + |x| e_w + e_x e_w."""
    ew = weight_rounding_bound(w, group_n, group_k)
    _, xs = quantize_per_token(x)
    ex = rounding_bound(x, xs[:, None])
    xa, wa = x.float().abs(), w.float().abs()
    return ex @ wa.T + xa @ ew.T + ex @ ew.T + gemm_rounding_bound(xa + ex, wa + ew, torch.float32)


def gemm_rounding_bound(x_abs: torch.Tensor, w_abs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, N]: how far two float32 GEMMs of the same operands may differ when
    they sum in different orders (K * 2^-23 * sum_k |x_k w_k|) and then round
    to ``out_dtype`` (half an ulp each side, relative to the magnitude sum)."""
    mag = x_abs.float() @ w_abs.float().T
    k = x_abs.shape[-1]
    return mag * (k * _FP32_EPS + 2 * _HALF_ULP[out_dtype]) + 1e-30


def fp8_weight_bytes(n: int, k: int, group_n: int, group_k: int) -> int:
    """Bytes of an fp8 weight and its float32 scales."""
    sn, sk = scale_shape(n, k, group_n, group_k)
    return n * k + 4 * sn * sk

