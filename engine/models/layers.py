"""Building blocks of the Llama-style decoder: fused projections, attention, MLP.

Parameters are allocated uninitialised on the target device and dtype and
filled by ``CausalLM.load_weights``; nothing here draws random numbers.
Checkpoint tensors that this code fuses (q/k/v, gate/up) are written into
row ranges of one weight, described by ``ShardSlot``.

FP8 projections: a ``Linear`` built with ``fp8_groups`` holds its weight in
float8_e4m3fn with a float32 ``weight_scale`` (layout:
``splitserve.kernels.fp8_gemm``), as an fp8 checkpoint stores it
(``splitserve.engine.quantization`` says which), or as ``quantize_fp8_``
makes it from a full-precision one (per output channel). It multiplies with
``ops.fp8_w8a8_linear`` (activations quantized per token) on GPUs with FP8
tensor cores and ``ops.fp8_w8a16_linear`` (weight dequantized in the kernel,
or per call on the CPU: never a second resident copy) elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitserve.engine.attention import AttentionMetadata, paged_attention_layer
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.quantization import Groups, QuantizationConfig, layer_groups
from splitserve.engine.models.alibi import family_alibi_slopes
from splitserve.engine.models.float_layer_norm import FloatLayerNorm
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.rope import apply_rotary
from splitserve.kernels import ops
from splitserve.kernels.fp8_gemm import FP8_WEIGHT_DTYPE, quantize_weight, scale_shape
from splitserve.kernels.lora import LoraMeta


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


@dataclass(frozen=True)
class ShardSlot:
    """Where one checkpoint tensor lands: rows [start, start + size) of ``param``."""

    param: nn.Parameter
    start: int | None = None  # None: the whole parameter
    size: int | None = None

    @property
    def target(self) -> torch.Tensor:
        if self.start is None:
            return self.param.data
        return self.param.data.narrow(0, self.start, self.size)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        """Copy checkpoint tensor ``name`` into place, converting dtype and device."""
        target = self.target
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"tensor {name!r} has dtype {tensor.dtype}; integer-quantized checkpoints are not "
                "supported (fp8 ones are)")
        if (tensor.dtype == FP8_WEIGHT_DTYPE) != (target.dtype == FP8_WEIGHT_DTYPE):
            raise CheckpointError(
                f"tensor {name!r} is {tensor.dtype} where {target.dtype} is expected: fp8 tensors "
                "need a quantization_config naming their scales, and only projection weights are "
                "read in fp8")
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {name!r}: expected shape {list(target.shape)}, got {list(tensor.shape)}"
            )
        target.copy_(tensor)


@dataclass(frozen=True)
class ScaleSlot(ShardSlot):
    """The scales of checkpoint weight rows [row, row + rows) (``k`` columns,
    stored in ``source`` groups) in a fused weight_scale whose groups are
    ``row_group`` rows: rows of groups copied as they are, or repeated to
    one per weight row when ``row_group`` is 1. ``expert``: the slice of a
    stacked [E, ...] scale."""

    rows: int = 0
    k: int = 0
    source: Groups = (1, 1)
    row_group: int = 1
    expert: int | None = None

    @property
    def target(self) -> torch.Tensor:
        t = self.param.data if self.expert is None else self.param.data[self.expert]
        return t.narrow(0, self.start, self.size)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        sn, sk = scale_shape(self.rows, self.k, *self.source)
        if tensor.numel() != sn * sk:
            raise CheckpointError(f"tensor {name!r}: expected {sn * sk} scales ([{sn}, {sk}]) for "
                                  f"its [{self.rows}, {self.k}] weight, got shape {list(tensor.shape)}")
        src = tensor.float().reshape(sn, sk)
        if self.row_group == 1 and self.source[0] > 1:
            src = src.repeat_interleave(self.source[0], 0)[:self.rows]
        self.target.copy_(src)


def scale_slot(param: nn.Parameter, row: int, rows: int, k: int, source: Groups, row_group: int,
               expert: int | None = None) -> ScaleSlot:
    """Where the scale of a [rows, k] checkpoint weight fused at ``row`` lands."""
    start, size = (row, rows) if row_group == 1 else (row // row_group, -(-rows // row_group))
    return ScaleSlot(param, start, size, rows=rows, k=k, source=source, row_group=row_group,
                     expert=expert)


def fp8_activations_supported(device: torch.device | str) -> bool:
    """Whether fp8 x fp8 matmuls run here: CUDA GPUs with FP8 tensor cores (sm_89+)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class RMSNorm(nn.Module):
    """``ops.rms_norm`` with its weight; ``fp32_product``: the weight
    multiplied in float32 and the product rounded once (see the op)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str,
                 fp32_product: bool = False):
        super().__init__()
        self.eps = eps
        self.fp32_product = fp32_product
        self.weight = empty_param(dim, dtype=dtype, device=device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: [N, dim]; with residual returns (norm(x + residual), x + residual)
        return ops.rms_norm(x, self.weight, self.eps, residual, self.fp32_product)


class LayerNorm(nn.Module):
    """``torch.nn.functional.layer_norm`` with a weight and a bias (StarCoder2,
    Phi, StableLM), and ``RMSNorm``'s interface: with ``residual`` returns
    (norm(x + residual), x + residual). A torch op on every device: the
    kernel registry has no LayerNorm kernel."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, dtype=dtype, device=device)
        self.bias = empty_param(dim, dtype=dtype, device=device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if residual is not None:
            x = x + residual
        normed = torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return normed, (x if residual is not None else None)


def model_norm(cfg: ModelConfig, dim: int, dtype: torch.dtype,
               device: torch.device | str) -> RMSNorm | LayerNorm | FloatLayerNorm:
    """An RMSNorm of ``dim`` rounding as ``cfg``'s family does (a LayerNorm
    for the families with ``FamilyOptions.layer_norm``, a float32 one for
    those with ``float_layer_norm``). Gemma's
    ``1 + weight`` is kept in float32: transformers sums it in float32 for
    the product, and a 16-bit copy would round it (1 + w near 1 keeps only
    8 bits of w in bf16)."""
    opts = cfg.options
    if opts.float_layer_norm:
        return FloatLayerNorm((dim,), cfg.rms_norm_eps, dtype, device,
                              weight=opts.float_layer_norm != "none",
                              cohere=opts.float_layer_norm == "cohere")
    if opts.layer_norm:
        return LayerNorm(dim, cfg.rms_norm_eps, dtype, device)
    weight_dtype = torch.float32 if opts.norm_plus_one else dtype
    return RMSNorm(dim, cfg.rms_norm_eps, weight_dtype, device, fp32_product=opts.norm_fp32_product)


def norm_slots(prefix: str, norm: RMSNorm | LayerNorm | FloatLayerNorm) -> dict[str, ShardSlot]:
    """A norm's checkpoint tensors: ``prefix.weight`` and ``prefix.bias``, those it has."""
    return {f"{prefix}.{kind}": ShardSlot(param) for kind in ("weight", "bias")
            if (param := getattr(norm, kind, None)) is not None}


class Linear(nn.Module):
    """y = x W^T (+ b); weight [out, in] as checkpoints store it.

    With ``fp8_groups`` (group_n, group_k): weight in float8_e4m3fn and
    ``weight_scale`` [ceil(out/group_n), ceil(in/group_k)] float32; the bias
    stays in ``dtype``."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype, device: torch.device | str,
                 fp8_groups: Groups | None = None):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.fp8_groups = fp8_groups
        if fp8_groups is None:
            self.weight = empty_param(d_out, d_in, dtype=dtype, device=device)
            self.register_parameter("weight_scale", None)
        else:
            self.weight = empty_param(d_out, d_in, dtype=FP8_WEIGHT_DTYPE, device=device)
            self.weight_scale = empty_param(*scale_shape(d_out, d_in, *fp8_groups),
                                            dtype=torch.float32, device=device)
        self.bias = empty_param(d_out, dtype=dtype, device=device) if bias else None
        # activations quantized per token too (fp8 x fp8), where the GPU can
        self.fp8_activations = fp8_groups is not None and fp8_activations_supported(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            return ops.linear(x, self.weight, self.bias)
        fp8_linear = ops.fp8_w8a8_linear if self.fp8_activations else ops.fp8_w8a16_linear
        return fp8_linear(x, self.weight, self.weight_scale, *self.fp8_groups, self.bias)

    @torch.no_grad()
    def quantize_fp8_(self) -> None:
        """Replace a full-precision weight by fp8 with one scale per output
        row; an fp8 weight is left as it is."""
        if self.weight_scale is not None:
            return
        w8, scale = quantize_weight(self.weight.data, 1, self.in_features)
        self.weight = nn.Parameter(w8, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.fp8_groups = (1, self.in_features)
        self.fp8_activations = fp8_activations_supported(w8.device)


def linear_slots(linear: Linear, shards: list[tuple[str, int, int]],
                 quant: QuantizationConfig | None) -> dict[str, ShardSlot]:
    """Checkpoint tensor name -> slot, for a Linear fused from ``shards``
    ((checkpoint module name, first row, rows), in row order; one shard
    covering every row for an unfused Linear): weights, biases and, for an
    fp8 Linear, the scales."""
    slots: dict[str, ShardSlot] = {}
    whole = len(shards) == 1
    for name, row, rows in shards:
        for kind in ("weight", "bias") if linear.bias is not None else ("weight",):
            param = getattr(linear, kind)
            slots[f"{name}.{kind}"] = ShardSlot(param) if whole else ShardSlot(param, row, rows)
        if linear.weight_scale is not None and quant is not None:
            info = quant.weights[f"{name}.weight"]
            slots[info.scale_name] = scale_slot(linear.weight_scale, row, rows, linear.in_features,
                                                info.groups, linear.fp8_groups[0])
    return slots


class Attention(nn.Module):
    float_rope = False  # RoPE on float32 copies of q/k, rounded once (Cohere)

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0, prefix: str = "self_attn"):
        super().__init__()
        self.quant = cfg.quantization
        self.dtype = dtype
        self.sliding_window = sliding_window  # 0: attends to the whole context
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        opts = cfg.options  # Gemma 2/3 and Granite scale scores their own way; Gemma 2 caps them
        self.scale = self.head_dim**-0.5 if opts.attn_scale is None else opts.attn_scale
        self.softcap = opts.attn_softcap
        # q, k and v in one matmul: rows [q | k | v]
        self.qkv_proj = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, dtype, device,
            fp8_groups=layer_groups(self.quant, [(f"{prefix}.{n}_proj.weight", r) for n, r in (
                ("q", self.q_size), ("k", self.kv_size), ("v", self.kv_size))], cfg.hidden_size),
        )
        self.o_name = opts.o_proj_name  # its checkpoint name (Phi: dense)
        self.o_proj = Linear(
            self.q_size, cfg.hidden_size, cfg.o_proj_bias, dtype, device,
            fp8_groups=layer_groups(self.quant, [(f"{prefix}.{self.o_name}.weight", cfg.hidden_size)],
                                    self.q_size))
        # q/k norms: per head (Qwen3) or, with full_qk_norm, over all heads at once (OLMo 2)
        self.full_qk_norm = opts.full_qk_norm
        q_dim, k_dim = (self.q_size, self.kv_size) if self.full_qk_norm else (self.head_dim, self.head_dim)
        self.q_norm = model_norm(cfg, q_dim, dtype, device) if cfg.qk_norm else None
        self.k_norm = model_norm(cfg, k_dim, dtype, device) if cfg.qk_norm else None
        self.split_qk_norm = None  # tensor parallel, full_qk_norm: splitserve.engine.parallel.qk_norm
        self.clip_qkv = opts.clip_qkv  # OLMo, OLMoE: q, k and v clamped to [-c, c]
        self.qk_norm_after_rope = opts.qk_norm_after_rope  # HunYuan: q/k normed once rotated
        # gpt-oss: a learned logit per query head joining its softmax's denominator
        self.sinks = (empty_param(self.num_heads, dtype=torch.float32, device=device)
                      if opts.attention_sinks else None)
        # Bloom, MPT, Falcon alibi: [Hq] float32 ALiBi slopes (None: none)
        self.register_buffer("alibi_slopes", family_alibi_slopes(cfg, device), persistent=False)
        self.qkv_lora: LoraStack | None = None  # enable_lora
        self.o_lora: LoraStack | None = None

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """Allocate the projections' LoRA stacks; checkpoint projection name
        -> (its stack, its slice)."""
        dev = self.o_proj.weight.device
        hidden = self.qkv_proj.in_features
        self.qkv_lora = LoraStack(hidden, (self.q_size, self.kv_size, self.kv_size), num_slots,
                                  max_rank, self.dtype, dev)
        self.o_lora = LoraStack(self.q_size, (self.o_proj.out_features,), num_slots, max_rank,
                                self.dtype, dev)
        q, o = self.qkv_lora, self.o_lora
        return {"q_proj": (q, 0), "k_proj": (q, 1), "v_proj": (q, 2), "o_proj": (o, 0)}

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        layer_cache: torch.Tensor,  # [2, NB, BS, Hk, D]
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor | None,  # [max_position, D] float32; None: no RoPE (SmolLM3)
        lora: LoraMeta | None = None,  # the step's adapters, when any token has one
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hk) D]
        if lora is not None and self.qkv_lora is not None:
            self.qkv_lora.add_to(qkv, x, lora)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Kernels (rotary in place, store, attention) take contiguous [T, H, D].
        q = q.reshape(t, self.num_heads, self.head_dim).contiguous()
        k = k.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        v = v.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        if self.q_norm is not None and not self.qk_norm_after_rope:
            q, k = self.norm_qk(q, k)
        if self.clip_qkv is not None:  # after the q/k norms (OLMoE), before RoPE and the cache
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        if cos_sin_cache is not None:
            q, k = apply_rotary(positions, q, k, cos_sin_cache, self.float_rope)
        if self.q_norm is not None and self.qk_norm_after_rope:
            q, k = self.norm_qk(q, k)
        q, k = self.position_qk(positions, q, k, cos_sin_cache)
        out = paged_attention_layer(q, k, v, layer_cache, meta, self.scale, self.sliding_window,
                                    self.softcap, sinks=self.sinks,
                                    alibi_slopes=self.alibi_slopes)  # [T, Hq, D]
        out = self.gate_output(x, out.reshape(t, self.q_size))
        y = self.o_proj(out)
        if lora is not None and self.o_lora is not None:
            self.o_lora.add_to(y, out, lora)
        return y

    def gate_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The attention output [T, Hq * D] as ``o_proj`` takes it, given the
        layer's input ``x`` (gated attention overrides it)."""
        return out

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D] and k [T, Hk, D] normed before RoPE (after it: HunYuan). Qwen3,
        Gemma 3: RMSNorm over each head's D dims; OLMo 2: over a token's whole q (Hq*D)
        and k (Hk*D), across the tensor-parallel ranks' heads when split."""
        if self.split_qk_norm is not None:
            return self.split_qk_norm(q, k, self.q_norm, self.k_norm)
        rows = q.shape[0] if self.full_qk_norm else -1
        q = self.q_norm(q.view(rows, self.q_norm.weight.shape[0]))[0].view(q.shape)
        k = self.k_norm(k.view(rows, self.k_norm.weight.shape[0]))[0].view(k.shape)
        return q, k

    def position_qk(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    cos_sin_cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k, rotated and normed, as the kernel takes them (Llama 4 overrides it)."""
        return q, k

    def quantize_fp8_(self) -> None:
        self.qkv_proj.quantize_fp8_()
        self.o_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        """Checkpoint tensor name -> where it is stored."""
        q, kv = self.q_size, self.kv_size
        slots = linear_slots(self.qkv_proj, [(f"{prefix}.q_proj", 0, q), (f"{prefix}.k_proj", q, kv),
                                             (f"{prefix}.v_proj", q + kv, kv)], self.quant)
        slots.update(linear_slots(self.o_proj, [(f"{prefix}.{self.o_name}", 0, self.o_proj.out_features)],
                                  self.quant))
        if self.q_norm is not None:
            slots[f"{prefix}.q_norm.weight"] = ShardSlot(self.q_norm.weight)
            slots[f"{prefix}.k_norm.weight"] = ShardSlot(self.k_norm.weight)
        if self.sinks is not None:
            slots[f"{prefix}.sinks"] = ShardSlot(self.sinks)
        return slots


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 prefix: str = "mlp"):
        super().__init__()
        self.intermediate = i = cfg.intermediate_size
        self.quant = cfg.quantization
        self.dtype = dtype
        self.gate_up_lora: LoraStack | None = None  # enable_lora
        self.down_lora: LoraStack | None = None
        # GeGLU (Gemma) or SwiGLU (the rest), over [gate | up] rows
        gelu = cfg.options.hidden_act == "gelu_tanh"
        self.act_and_mul = ops.gelu_tanh_and_mul if gelu else ops.silu_and_mul
        # gate and up in one matmul: rows [gate | up], as act_and_mul expects
        self.gate_up_proj = Linear(
            cfg.hidden_size, 2 * i, cfg.mlp_bias, dtype, device,
            fp8_groups=layer_groups(self.quant, [(f"{prefix}.gate_proj.weight", i),
                                                 (f"{prefix}.up_proj.weight", i)], cfg.hidden_size))
        self.down_proj = Linear(
            i, cfg.hidden_size, cfg.mlp_bias, dtype, device,
            fp8_groups=layer_groups(self.quant, [(f"{prefix}.down_proj.weight", cfg.hidden_size)], i))

    def forward(self, x: torch.Tensor, lora: LoraMeta | None = None) -> torch.Tensor:
        # x: [T, hidden] -> [T, 2I] -> [T, I] -> [T, hidden]
        if lora is None or self.gate_up_lora is None:
            return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))
        act = self.act_and_mul(self.gate_up_lora.add_to(self.gate_up_proj(x), x, lora))
        return self.down_lora.add_to(self.down_proj(act), act, lora)

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """As ``Attention.enable_lora``, for gate, up and down."""
        dev, i = self.down_proj.weight.device, self.intermediate
        hidden = self.gate_up_proj.in_features
        self.gate_up_lora = LoraStack(hidden, (i, i), num_slots, max_rank, self.dtype, dev)
        self.down_lora = LoraStack(i, (hidden,), num_slots, max_rank, self.dtype, dev)
        gu = self.gate_up_lora
        return {"gate_proj": (gu, 0), "up_proj": (gu, 1), "down_proj": (self.down_lora, 0)}

    def quantize_fp8_(self) -> None:
        self.gate_up_proj.quantize_fp8_()
        self.down_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        i = self.intermediate
        slots = linear_slots(self.gate_up_proj, [(f"{prefix}.gate_proj", 0, i),
                                                 (f"{prefix}.up_proj", i, i)], self.quant)
        slots.update(linear_slots(self.down_proj, [(f"{prefix}.down_proj", 0, self.down_proj.out_features)],
                                  self.quant))
        return slots
