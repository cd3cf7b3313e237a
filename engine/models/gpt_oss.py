"""gpt-oss (``GptOssForCausalLM``): the Llama-style decoder with attention
sinks (``FamilyOptions.attention_sinks``: ``self_attn.sinks`` join each
softmax's denominator, in every attention kernel), windows on the layers
``layer_types`` marks, q/k/v/o biases, and in every layer gpt-oss's
mixture of experts, ``GptOssMoE``, as transformers' ``GptOssMLP`` runs it:

- the router ``mlp.router`` is a linear layer with a bias; each token takes
  the ``top_k`` largest logits and a softmax over those k weights them;
- expert e computes ``gate_up = x @ gate_up_proj[e] + gate_up_proj_bias[e]``
  with gate and up interleaved along its last dim (gate = [..., ::2],
  up = [..., 1::2]); gate clamped above at ``swiglu_limit``, up to
  +-``swiglu_limit``; ``h = (up + 1) * gate * sigmoid(gate * swiglu_alpha)``;
  its output ``h @ down_proj[e] + down_proj_bias[e]``.

Checkpoints store each layer's experts fused (``mlp.experts.gate_up_proj``
[E, H, 2I], ``gate_up_proj_bias`` [E, 2I], ``down_proj`` [E, I, H],
``down_proj_bias`` [E, H]); ``GptOssCausalLM.mapped`` splits them at load
into per-expert gate, up and down tensors (de-interleaved, transposed to
[out, in]), stacked as ``SparseMoeBlock`` stacks experts: ``w_gate_up``
[E, 2I, H] with rows [gate | up], ``w_down`` [E, H, I], and their biases.
MXFP4 checkpoints (the released ones) store ``gate_up_proj_blocks`` /
``_scales`` and ``down_proj_blocks`` / ``_scales`` instead, rows [out, in]:
each pair is dequantized expert by expert, then split the same way.
Tensor parallelism then splits them as it splits any expert (the sinks go
with their query heads).

The experts run in torch on every device (the fused Triton MoE kernel has
neither biases nor this activation): each expert on the tokens routed to
it, grouped on the host; while a CUDA graph is being captured (decode
steps), every expert on every token, the unchosen ones' outputs masked
out, since capture allows no host sync. LoRA adapters are refused.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.engine.models.mapped import MappedCausalLM
from splitserve.engine.models.moe import ExpertSlot
from splitserve.engine.models.mxfp4 import dequantize_mxfp4
from splitserve.kernels import ops
from splitserve.kernels.reference import routed_experts

_FUSED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def route_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router logits [T, E] -> (weights [T, K], expert ids [T, K]): the k largest
    logits, softmax-ed among themselves in their dtype (GptOssTopKRouter)."""
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top, dim=-1), ids


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """[n, 2I] rows [gate | up] -> [n, I]: (up + 1) * gate * sigmoid(gate * alpha),
    gate clamped above at ``limit`` and up to [-limit, limit] (GptOssExperts._apply_gate)."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class GptOssMoE(nn.Module):
    """The router and the experts of one layer (``mlp`` in checkpoints)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        moe = cfg.moe
        h, i, e = cfg.hidden_size, moe.expert_intermediate_size, moe.num_experts
        self.top_k, self.intermediate = moe.top_k, i
        self.alpha, self.limit = moe.swiglu_alpha, moe.swiglu_limit
        self.router = Linear(h, e, True, dtype, device)
        self.w_gate_up = empty_param(e, 2 * i, h, dtype=dtype, device=device)
        self.b_gate_up = empty_param(e, 2 * i, dtype=dtype, device=device)
        self.w_down = empty_param(e, h, i, dtype=dtype, device=device)
        self.b_down = empty_param(e, h, dtype=dtype, device=device)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` [n, H] -> [n, H]."""
        act = clamped_swiglu(ops.linear(x, self.w_gate_up[e], self.b_gate_up[e]), self.alpha, self.limit)
        return ops.linear(act, self.w_down[e], self.b_down[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> router logits [T, E] -> K experts per token -> [T, hidden]
        weights, ids = route_top_k(self.router(x), self.top_k)
        num_experts = self.w_gate_up.shape[0]
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self.every_expert(x, weights, ids)
        return routed_experts(x, weights, ids, num_experts, self.expert)

    def every_expert(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``routed_experts``' result without grouping tokens on the host: every
        expert on every token, each token's unchosen experts masked out."""
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in range(self.w_gate_up.shape[0]):
            chosen = ids == e  # [T, K]: at most one per row
            weight = (weights.float() * chosen).sum(dim=-1, keepdim=True)  # [T, 1]
            y = self.expert(e, x).float() * weight
            out += torch.where(chosen.any(dim=-1, keepdim=True), y, 0.0)
        return out.to(x.dtype)

    def quantize_fp8_(self) -> None:
        """The experts stay in the model dtype: their torch path has no fp8 form."""

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        """Per-expert names, as ``GptOssCausalLM.mapped`` splits the fused tensors."""
        i = self.intermediate
        slots = linear_slots(self.router, [(f"{prefix}.router", 0, self.router.out_features)], None)
        for e in range(self.w_gate_up.shape[0]):
            p = f"{prefix}.experts.{e}"
            for name, row in (("gate_proj", 0), ("up_proj", i)):
                slots[f"{p}.{name}.weight"] = ExpertSlot(self.w_gate_up, row, i, expert=e)
                slots[f"{p}.{name}.bias"] = ExpertSlot(self.b_gate_up, row, i, expert=e)
            slots[f"{p}.down_proj.weight"] = ExpertSlot(self.w_down, expert=e)
            slots[f"{p}.down_proj.bias"] = ExpertSlot(self.b_down, expert=e)
        return slots


class GptOssCausalLM(MappedCausalLM):
    """gpt-oss: ``GptOssMoE`` in every layer, its fused expert tensors split at
    load (MXFP4 ones dequantized first, ``splitserve.engine.models.mxfp4``)."""

    lora_refusal = ("LoRA adapters are not supported for GptOssForCausalLM (its experts are fused "
                    "and its attention has sinks); serve it with max_loras 0")

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        return DecoderLayer(self.cfg, dtype, device, window, prefix=prefix,
                            mlp=GptOssMoE(self.cfg, dtype, device))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._packed: dict[str, tuple[str, torch.Tensor]] = {}  # MXFP4 halves awaiting their pair
        super().load_weights(self._paired(weights))

    def _paired(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        yield from weights
        if self._packed:
            names = ", ".join(f"{k}_{part}" for k, (part, _) in self._packed.items())
            raise CheckpointError(f"MXFP4 tensor(s) without their blocks or scales: {names}")

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        base, _, kind = name.rpartition(".")
        if not base.endswith(".mlp.experts"):
            return ((name, tensor),)
        if kind in _FUSED:
            return self._split(base, kind, tensor.unbind(0))
        proj, _, part = kind.rpartition("_")
        if proj not in ("gate_up_proj", "down_proj") or part not in ("blocks", "scales"):
            return ((name, tensor),)
        key = f"{base}.{proj}"
        if key not in self._packed:
            self._packed[key] = (part, tensor)
            return ()
        other_part, other = self._packed.pop(key)
        if other_part == part:
            raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint")
        blocks, scales = (tensor, other) if part == "blocks" else (other, tensor)
        # each expert's [out, in] rows dequantized, then laid out [in, out] as bf16 checkpoints store them
        experts = (dequantize_mxfp4(b, s, key).t() for b, s in zip(blocks, scales))
        return self._split(base, proj, experts)

    def _split(self, base: str, kind: str,
               experts: Iterable[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """One fused expert tensor, expert by expert -> each expert's gate, up or down tensor."""
        for e, t in enumerate(experts):
            p = f"{base}.{e}"
            if kind == "gate_up_proj":  # [H, 2I], gate and up interleaved -> [I, H] each
                yield f"{p}.gate_proj.weight", t[:, ::2].t()
                yield f"{p}.up_proj.weight", t[:, 1::2].t()
            elif kind == "gate_up_proj_bias":
                yield f"{p}.gate_proj.bias", t[::2]
                yield f"{p}.up_proj.bias", t[1::2]
            elif kind == "down_proj":  # [I, H] -> [H, I]
                yield f"{p}.down_proj.weight", t.t()
            else:
                yield f"{p}.down_proj.bias", t
