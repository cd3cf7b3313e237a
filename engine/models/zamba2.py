"""Zamba2 (``Zamba2ForCausalLM``): every layer is a pre-norm Mamba-2 layer
(``splitserve.engine.models.mamba2``) added to the residual stream; a hybrid
layer first runs one of the model's shared attention + MLP blocks on its
input concatenated with the original embeddings, passes the block's output
through its own ``linear`` and adds it to the Mamba-2 layer's input (not to
the residual stream):

    hybrid:  t = linear(shared([x, emb]));  x = x + mamba(norm(x + t))
    mamba:   x = x + mamba(norm(x))

A shared block: RMSNorm over the 2 x hidden_size concatenation, attention
(q/k/v from 2 x hidden_size, heads of 2 x hidden_size / heads, scores scaled
by (head_dim / 2) ** -0.5, RoPE with ``use_mem_rope``), RMSNorm, then the
MLP act(gate) * up of the fused ``gate_up_proj``; no residual inside. The
hybrid layers use the ``num_mem_blocks`` blocks in turn; each use has its own
KV cache slice and its own adapters, each a rank-``adapter_rank`` product
B(A h) added to q, k, v (``use_shared_attention_adapter``) and to gate_up.

Checkpoints store a block's weights, and every use's adapters of it, under
the first hybrid layer using it (``model.layers.L.shared_transformer``, the
adapters at list index = use); later layers' tied copies are skipped.

LoRA adapters (PEFT's, not the built-in adapters above) apply per layer as
PEFT trains them on transformers' model, where every use of a shared block
is its own module with tied weights: each hybrid layer holds its use's
stacks on the block's q/k/v/o, gate_up and down projections and on its own
``linear``; every layer's Mamba-2 mixer takes them on in_proj and out_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata, paged_attention_layer
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, model_norm, norm_slots
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.mamba2 import Mamba2Mixer
from splitserve.engine.models.rope import apply_rotary
from splitserve.kernels.lora import LoraMeta

_ACTS = {"gelu": F.gelu, "silu": F.silu}


class Adapter(nn.Module):
    """x -> B (A x), the rank-r product ``nn.Sequential(Linear, Linear)`` stores as 0 and 1."""

    def __init__(self, d_in: int, rank: int, d_out: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.down = empty_param(rank, d_in, dtype=dtype, device=device)
        self.up = empty_param(d_out, rank, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up)

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        return {f"{prefix}.0.weight": ShardSlot(self.down), f"{prefix}.1.weight": ShardSlot(self.up)}


class UseAdapters(nn.Module):
    """One use's adapters: q, k, v (or none) and the MLP's gate_up; and, after
    ``enable_lora``, its LoRA stacks on the shared block's projections."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        blocks, wide = cfg.options.zamba2, 2 * cfg.hidden_size
        r = blocks.adapter_rank
        self.qkv = (nn.ModuleList(Adapter(wide, r, wide, dtype, device) for _ in range(3))
                    if blocks.qkv_adapters else None)
        self.gate_up = Adapter(cfg.hidden_size, r, 2 * cfg.intermediate_size, dtype, device)
        self.loras = nn.ModuleDict()  # the block's projection -> this use's LoRA stack

    def enable_lora(self, block: "SharedBlock", num_slots: int, max_rank: int,
                    dtype: torch.dtype) -> dict[str, tuple[LoraStack, int]]:
        """LoRA stacks on this use of ``block``: q/k/v (one stack, three
        slices), o_proj, gate_up_proj (one slice, as transformers fuses it)
        and down_proj; PEFT's module name -> (stack, slice)."""
        q, kv = block.q_size, block.kv_size
        for name, d_in, slices in (("qkv_proj", block.qkv_proj.in_features, (q, kv, kv)),
                                   ("o_proj", q, (block.o_proj.out_features,)),
                                   ("gate_up_proj", block.gate_up_proj.in_features, (2 * block.intermediate,)),
                                   ("down_proj", block.intermediate, (block.down_proj.out_features,))):
            self.loras[name] = LoraStack(d_in, slices, num_slots, max_rank, dtype, block.o_proj.weight.device)
        qkv = self.loras["qkv_proj"]
        return {"q_proj": (qkv, 0), "k_proj": (qkv, 1), "v_proj": (qkv, 2),
                **{name: (self.loras[name], 0) for name in ("o_proj", "gate_up_proj", "down_proj")}}

    def add_lora(self, name: str, y: torch.Tensor, x: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        """y (projection ``name`` of x) plus each token's adapter's delta for this use."""
        if lora is not None and name in self.loras:
            self.loras[name].add_to(y, x, lora)
        return y

    def weight_slots(self, block: str, use: int) -> dict[str, ShardSlot]:
        slots = self.gate_up.weight_slots(f"{block}.feed_forward.gate_up_proj_adapter_list.{use}")
        for name, adapter in zip("qkv", self.qkv or ()):
            slots.update(adapter.weight_slots(f"{block}.self_attn.linear_{name}_adapter_list.{use}"))
        return slots


class SharedBlock(nn.Module):
    """A shared attention + MLP block (``Zamba2AttentionDecoderLayer``)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        h, wide = cfg.hidden_size, 2 * cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale = (cfg.head_dim / 2) ** -0.5
        self.input_layernorm = model_norm(cfg, wide, dtype, device)
        self.qkv_proj = Linear(wide, self.q_size + 2 * self.kv_size, False, dtype, device)
        self.o_proj = Linear(self.q_size, h, False, dtype, device)
        self.pre_ff_layernorm = model_norm(cfg, h, dtype, device)
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(h, 2 * self.intermediate, cfg.mlp_bias, dtype, device)
        self.down_proj = Linear(self.intermediate, h, cfg.mlp_bias, dtype, device)
        self.act = _ACTS[cfg.options.hidden_act]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, emb: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None, adapters: UseAdapters,
                lora: LoraMeta | None = None) -> torch.Tensor:
        t = x.shape[0]
        h, _ = self.input_layernorm(torch.cat([x, emb], dim=-1))
        qkv = adapters.add_lora("qkv_proj", self.qkv_proj(h), h, lora)
        if adapters.qkv is not None:
            qkv = qkv + torch.cat([a(h) for a in adapters.qkv], dim=-1)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim).contiguous()
        k = k.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        v = v.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        if cos_sin_cache is not None:
            q, k = apply_rotary(positions, q, k, cos_sin_cache)
        out = paged_attention_layer(q, k, v, cache, meta, self.scale).reshape(t, self.q_size)
        a, _ = self.pre_ff_layernorm(adapters.add_lora("o_proj", self.o_proj(out), out, lora))
        gate_up = adapters.add_lora("gate_up_proj", self.gate_up_proj(a), a, lora) + adapters.gate_up(a)
        gate, up = gate_up.split([self.intermediate, self.intermediate], -1)
        m = self.act(gate) * up
        return adapters.add_lora("down_proj", self.down_proj(m), m, lora)

    def quantize_fp8_(self) -> None:
        for lin in (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj):
            lin.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        q, kv = self.q_size, self.kv_size
        slots = {**norm_slots(f"{prefix}.input_layernorm", self.input_layernorm),
                 **norm_slots(f"{prefix}.pre_ff_layernorm", self.pre_ff_layernorm)}
        for name, row, rows in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
            slots[f"{prefix}.self_attn.{name}_proj.weight"] = ShardSlot(self.qkv_proj.weight, row, rows)
        slots[f"{prefix}.self_attn.o_proj.weight"] = ShardSlot(self.o_proj.weight)
        for name in ("gate_up_proj", "down_proj"):
            lin = getattr(self, name)
            slots[f"{prefix}.feed_forward.{name}.weight"] = ShardSlot(lin.weight)
            if lin.bias is not None:
                slots[f"{prefix}.feed_forward.{name}.bias"] = ShardSlot(lin.bias)
        return slots


class Zamba2Layer(nn.Module):
    """A Mamba-2 layer; with ``use`` (a hybrid layer), after its use of a shared block."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, state_index: int,
                 use: int | None):
        super().__init__()
        self.input_layernorm = model_norm(cfg, cfg.hidden_size, dtype, device)
        self.mamba = Mamba2Mixer(cfg, dtype, device, state_index)
        self.use = use
        self.adapters = UseAdapters(cfg, dtype, device) if use is not None else None
        self.linear = Linear(cfg.hidden_size, cfg.hidden_size, False, dtype, device) if use is not None else None
        self.linear_lora: LoraStack | None = None  # enable_lora, on a hybrid layer

    def forward(self, positions: torch.Tensor, x: torch.Tensor, emb: torch.Tensor, block: SharedBlock | None,
                cache: torch.Tensor | None, meta: AttentionMetadata,
                cos_sin_cache: torch.Tensor | None, lora: LoraMeta | None = None) -> torch.Tensor:
        h = x
        if block is not None:
            t = block(positions, x, emb, cache, meta, cos_sin_cache, self.adapters, lora)
            t2 = self.linear(t)
            if lora is not None and self.linear_lora is not None:
                self.linear_lora.add_to(t2, t, lora)
            h = x + t2
        h, _ = self.input_layernorm(h)
        return x + self.mamba(positions, h, None, meta, lora=lora)

    def enable_lora(self, block: SharedBlock | None, num_slots: int,
                    max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """LoRA stacks on the Mamba-2 mixer and, on a hybrid layer, on its use
        of ``block`` and its ``linear``; PEFT's module name -> (stack, slice)."""
        out = self.mamba.enable_lora(num_slots, max_rank)
        if block is not None:
            dtype, h = self.mamba.dtype, self.linear.in_features
            self.linear_lora = LoraStack(h, (h,), num_slots, max_rank, dtype, self.linear.weight.device)
            out["linear"] = (self.linear_lora, 0)
            out.update(self.adapters.enable_lora(block, num_slots, max_rank, dtype))
        return out

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        inner = prefix if self.use is None else f"{prefix}.mamba_decoder"
        slots = {**norm_slots(f"{inner}.input_layernorm", self.input_layernorm),
                 **self.mamba.weight_slots(f"{inner}.mamba")}
        if self.linear is not None:
            slots[f"{prefix}.linear.weight"] = ShardSlot(self.linear.weight)
        return slots


class Zamba2CausalLM(HybridCausalLM):
    """The layers (hybrid ones numbered by use), the shared blocks, and the
    forward that hands each layer the embeddings and its use's block."""

    takes_lora = True  # checked against PEFT (tests/unit/test_lora_engine.py)

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        self._uses: list[int] = []  # the hybrid layers, in order
        super().__init__(cfg, dtype, device)
        n = cfg.options.zamba2.num_blocks
        self.blocks = nn.ModuleList(SharedBlock(cfg, dtype, device) for _ in range(min(n, len(self._uses))))
        # block b's checkpoint home: the first hybrid layer using it
        self.block_homes = [f"model.layers.{layer}.shared_transformer" for layer in self._uses[:n]]

    def build_layer(self, index: int, window: int, dtype: torch.dtype, device: torch.device | str) -> Zamba2Layer:
        layout = self.cfg.options.hybrid
        use = None
        if index in layout.attention_layers:
            use = len(self._uses)
            self._uses.append(index)
        return Zamba2Layer(self.cfg, dtype, device, layout.state_index(index), use)

    def state_mixer(self, index: int) -> nn.Module:
        return self.layers[index].mamba

    def block_of(self, layer: Zamba2Layer) -> SharedBlock | None:
        """The shared block a hybrid layer uses; None for a Mamba-2 layer."""
        return None if layer.use is None else self.blocks[layer.use % len(self.blocks)]

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        """As ``CausalLM.enable_lora``, each hybrid layer's stacks on its use of its shared block."""
        return {(i, name): target for i, layer in enumerate(self.layers)
                for name, target in layer.enable_lora(self.block_of(layer), num_slots, max_rank).items()}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, on_layer_done=None, lora=None) -> torch.Tensor:
        if kv_cache.shape[0] != len(self._uses):
            raise ValueError(f"kv_cache has {kv_cache.shape[0]} layers, the model caches {len(self._uses)}")
        emb = self.embed(input_ids)
        x = emb
        rope = self.cos_sin_cache if self.cfg.options.zamba2.rope else None
        for layer in self.layers:
            if layer.use is None:
                x = layer(positions, x, emb, None, None, meta, None, lora)
                continue
            x = layer(positions, x, emb, self.block_of(layer), kv_cache[layer.use], meta, rope, lora)
            if on_layer_done is not None:
                on_layer_done(layer.use)  # cache layer ``use`` is complete
        x, _ = self.norm(x)
        return x

    def quantize_fp8_(self) -> None:
        for layer in self.layers:
            layer.mamba.quantize_fp8_()
        for block in self.blocks:
            block.quantize_fp8_()

    def weight_slots(self) -> dict[str, ShardSlot]:
        slots = {"model.embed_tokens.weight": ShardSlot(self.embed_tokens)}
        for i, layer in enumerate(self.layers):
            slots.update(layer.weight_slots(f"model.layers.{i}"))
            if layer.use is not None:
                home = self.block_homes[layer.use % len(self.blocks)]
                slots.update(layer.adapters.weight_slots(home, layer.use))
        for block, home in zip(self.blocks, self.block_homes):
            slots.update(block.weight_slots(home))
        slots.update(norm_slots(self.cfg.options.final_norm_name, self.norm))
        if self.lm_head is not None:
            slots["lm_head.weight"] = ShardSlot(self.lm_head)
        return slots

    def _skipped(self, name: str) -> bool:
        """Besides ``CausalLM``'s: later hybrid layers' tied copies of a shared block."""
        if ".shared_transformer." in name and not name.startswith(tuple(h + "." for h in self.block_homes)):
            return True
        return super()._skipped(name)
