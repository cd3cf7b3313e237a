"""Gemma 4's text decoder (``Gemma4ForCausalLM``, and the text tower of
``Gemma4ForConditionalGeneration``), as transformers' ``modeling_gemma4`` computes it.

Each layer (``Gemma4DecoderLayer``), on the hidden stream x:

- ``x + post_attention_layernorm(attn(input_layernorm(x)))``, then
  ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))`` (Gemma 2's
  sandwich, norms scaling by their weight in float32);
- with per-layer input embeddings (PLE), ``x + post_per_layer_input_norm(
  per_layer_projection(act(per_layer_input_gate(x)) * ple_i))``;
- x times the layer's ``layer_scalar`` (a checkpoint buffer).

With experts (``splitserve.engine.models.gemma4_moe``) the MLP's output is normed
(``post_feedforward_layernorm_1``) and added to the experts' (on
``pre_feedforward_layernorm_2(x)``, routed by x, normed by
``post_feedforward_layernorm_2``) before ``post_feedforward_layernorm``.

The PLE input of layer i (``per_layer_inputs``): the token's row of
``embed_tokens_per_layer`` (scaled by sqrt(ple_dim)) plus the RMSNormed
(``per_layer_projection_norm``) projection of the scaled embeddings
(``per_layer_model_projection``, times hidden_size ** -0.5), times 2 ** -0.5; its
i-th slice of ple_dim. The attention (``splitserve.engine.models.gemma4_attention``)
has the layer's own head shape and RoPE table (``Gemma4Shape.ropes``); the layers
that share keys and values attend over their source layer's cache.

Embeddings are scaled by sqrt(hidden_size) and tied; the logits soft-capped when
``final_logit_softcapping`` is set. ``Gemma4ForConditionalGeneration``: the text
model's tensors are read from under ``model.language_model.``; the vision and audio
towers' and their projectors' are skipped (the engine takes text only). LoRA
adapters are refused (the layers' projections differ from the shared decoder's);
tensor parallelism is refused by the dialect.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.gemma4_config import LayerRope
from splitserve.engine.models.gemma import GemmaCausalLM
from splitserve.engine.models.gemma4_attention import Gemma4Attention
from splitserve.engine.models.gemma4_moe import Gemma4Experts
from splitserve.engine.models.layers import MLP, Linear, ShardSlot, empty_param, linear_slots, model_norm
from splitserve.engine.models.mapped import MappedCausalLM
from splitserve.kernels.lora import LoraMeta

_WRAPPED_PREFIX = "model.language_model."  # Gemma4ForConditionalGeneration's text model
_SKIPPED_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
# the k/v tensors some exports keep for the layers that share another layer's keys and values
_SHARED_KV_TENSORS = ("k_proj", "v_proj", "k_norm", "v_norm")


def layer_rope_table(rope: LayerRope, max_position: int) -> torch.Tensor:
    """[max_position, head_dim] float32, cos then sin (``build_cos_sin_cache``'s layout),
    of transformers' default / proportional Gemma 4 frequencies."""
    exponents = torch.arange(0, rope.head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / rope.head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    inv_freq[rope.angles:] = 0.0
    inv_freq /= rope.factor
    freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


class Gemma4DecoderLayer(nn.Module):
    """One Gemma 4 layer; it keeps the hidden stream itself (no fused residual)."""

    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0):
        super().__init__()
        shape = cfg.options.gemma4
        norm = lambda dim=cfg.hidden_size: model_norm(cfg, dim, dtype, device)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = Gemma4Attention(cfg, index, dtype, device, sliding_window)
        width = shape.intermediate[index]
        mlp_cfg = cfg if width == cfg.intermediate_size else _with_intermediate(cfg, width)
        self.mlp = MLP(mlp_cfg, dtype, device, prefix=f"model.layers.{index}.mlp")
        self.gelu = cfg.options.hidden_act == "gelu_tanh"
        self.ple_dim = shape.ple_dim
        if self.ple_dim:
            self.per_layer_input_gate = Linear(cfg.hidden_size, self.ple_dim, False, dtype, device)
            self.per_layer_projection = Linear(self.ple_dim, cfg.hidden_size, False, dtype, device)
            self.post_per_layer_input_norm = norm()
        self.experts = Gemma4Experts(cfg, dtype, device) if shape.num_experts else None
        if self.experts is not None:  # the experts' and the MLP's outputs, normed apart
            self.post_feedforward_layernorm_1, self.post_feedforward_layernorm_2 = norm(), norm()
            self.pre_feedforward_layernorm_2 = norm()
        self.layer_scalar = empty_param(1, dtype=dtype, device=device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ple: torch.Tensor | None,
                layer_cache: torch.Tensor, meta: AttentionMetadata, cos_sin_cache: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(positions, self.input_layernorm(x)[0], layer_cache, meta, cos_sin_cache)
        x = x + self.post_attention_layernorm(h)[0]
        h = self.mlp(self.pre_feedforward_layernorm(x)[0])
        if self.experts is not None:
            routed = self.experts(x, self.pre_feedforward_layernorm_2(x)[0])
            h = self.post_feedforward_layernorm_1(h)[0] + self.post_feedforward_layernorm_2(routed)[0]
        x = x + self.post_feedforward_layernorm(h)[0]
        if self.ple_dim:
            gate = self.per_layer_input_gate(x)
            gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
            h = self.per_layer_projection(gate * ple)
            x = x + self.post_per_layer_input_norm(h)[0]
        return x * self.layer_scalar

    def quantize_fp8_(self) -> None:
        self.self_attn.quantize_fp8_()
        self.mlp.quantize_fp8_()
        if self.ple_dim:
            self.per_layer_input_gate.quantize_fp8_()
            self.per_layer_projection.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"]
        if self.ple_dim:
            norms.append("post_per_layer_input_norm")
        if self.experts is not None:
            norms += ["post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"]
        slots = {f"{prefix}.{n}.weight": ShardSlot(getattr(self, n).weight) for n in norms}
        if self.experts is not None:
            slots.update(self.experts.weight_slots(prefix))
        slots.update(self.self_attn.weight_slots(f"{prefix}.self_attn"))
        slots.update(self.mlp.weight_slots(f"{prefix}.mlp"))
        if self.ple_dim:
            for name in ("per_layer_input_gate", "per_layer_projection"):
                linear = getattr(self, name)
                slots.update(linear_slots(linear, [(f"{prefix}.{name}", 0, linear.out_features)], None))
        slots[f"{prefix}.layer_scalar"] = ShardSlot(self.layer_scalar)
        return slots


def _with_intermediate(cfg: ModelConfig, width: int) -> ModelConfig:
    """``cfg`` with MLPs ``width`` wide (the double-wide MLPs of shared layers)."""
    return dataclasses.replace(cfg, intermediate_size=width)


class Gemma4CausalLM(MappedCausalLM, GemmaCausalLM):
    """Gemma 4: per-layer RoPE tables, per-layer input embeddings, shared KV caches."""

    lora_refusal = ("LoRA adapters are not supported for Gemma 4 checkpoints (its layers' head shapes "
                    "and shared keys/values differ from the shared decoder's)")

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        shape = cfg.options.gemma4
        self.cos_sin_cache = None  # each layer type has its own table
        kinds = sorted(set(shape.ropes), key=shape.ropes.index)
        for j, rope in enumerate(kinds):
            self.register_buffer(f"rope_table_{j}", layer_rope_table(rope, cfg.max_position).to(device),
                                 persistent=False)
        self._table_of = [kinds.index(r) for r in shape.ropes]
        self.ple_dim = shape.ple_dim
        if self.ple_dim:
            width = cfg.num_layers * self.ple_dim
            self.embed_tokens_per_layer = empty_param(shape.ple_vocab, width, dtype=dtype, device=device)
            self.per_layer_model_projection = Linear(cfg.hidden_size, width, False, dtype, device)
            self.per_layer_projection_norm = model_norm(cfg, self.ple_dim, dtype, device)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> Gemma4DecoderLayer:
        return Gemma4DecoderLayer(self.cfg, index, dtype, device, window)

    def rope_table(self, index: int) -> torch.Tensor:
        return getattr(self, f"rope_table_{self._table_of[index]}")

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [cache layers, 2, NB, BS, Hk, D]
        meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None = None,
        lora: LoraMeta | None = None,  # always None: adapters are refused
    ) -> torch.Tensor:
        cached = self.cfg.num_cache_layers  # the shared layers, last, write no cache
        if kv_cache.shape[0] != cached:
            raise ValueError(f"kv_cache has {kv_cache.shape[0]} layers, the model caches {cached}")
        x = self.embed(input_ids)
        ple = self.per_layer_inputs(input_ids, x)
        sources = self.cfg.options.gemma4.kv_source
        for i, layer in enumerate(self.layers):
            x = layer(positions, x, None if ple is None else ple[:, i], kv_cache[sources[i]], meta,
                      self.rope_table(i))
            if on_layer_done is not None and i < cached:
                on_layer_done(i)  # cache layer i is complete (a hand-off may send it)
        return self.norm(x)[0]

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """[T, layers, ple_dim]: each layer's per-layer input (None without PLE)."""
        if not self.ple_dim:
            return None
        t, n, p = x.shape[0], self.cfg.num_layers, self.ple_dim
        scale = torch.tensor(p ** 0.5, dtype=x.dtype, device=x.device)
        tokens = (F.embedding(input_ids, self.embed_tokens_per_layer) * scale).view(t, n, p)
        proj = self.per_layer_model_projection(x) * self.cfg.hidden_size ** -0.5
        proj = self.per_layer_projection_norm(proj.reshape(t * n, p))[0].view(t, n, p)
        return (proj + tokens) * 2.0 ** -0.5

    def quantize_fp8_(self) -> None:
        super().quantize_fp8_()
        if self.ple_dim:
            self.per_layer_model_projection.quantize_fp8_()

    def weight_slots(self) -> dict[str, ShardSlot]:
        slots = {"model.embed_tokens.weight": ShardSlot(self.embed_tokens),
                 "model.norm.weight": ShardSlot(self.norm.weight)}
        for i, layer in enumerate(self.layers):
            slots.update(layer.weight_slots(f"model.layers.{i}"))
        if self.lm_head is not None:
            slots["lm_head.weight"] = ShardSlot(self.lm_head)
        if self.ple_dim:
            slots["model.embed_tokens_per_layer.weight"] = ShardSlot(self.embed_tokens_per_layer)
            slots["model.per_layer_model_projection.weight"] = ShardSlot(self.per_layer_model_projection.weight)
            slots["model.per_layer_projection_norm.weight"] = ShardSlot(self.per_layer_projection_norm.weight)
        return slots

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.startswith(_SKIPPED_PREFIXES):
            return
        if name.startswith(_WRAPPED_PREFIX):
            name = "model." + name[len(_WRAPPED_PREFIX):]
        parts = name.split(".")
        if (len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn"
                and parts[4] in _SHARED_KV_TENSORS and self.cfg.options.gemma4.shares_kv(int(parts[2]))):
            return  # transformers ignores them too
        yield name, tensor
