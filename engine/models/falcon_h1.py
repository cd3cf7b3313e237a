"""Falcon-H1 (``FalconH1ForCausalLM``): every layer runs a Mamba-2 mixer
(``splitserve.engine.models.mamba2``, checkpoint name ``mamba``) and Llama
attention side by side on the same normed input and sums their outputs,
then a SwiGLU ``feed_forward`` behind ``pre_ff_layernorm``; the final norm
is ``model.final_layernorm``. Each layer keeps a recurrent state and a KV
cache slice (``falcon_h1_config.PARALLEL_KIND``).

The multipliers (``FamilyOptions.falcon_h1``) apply where transformers'
FalconH1 applies them: the embeddings; the normed input into the mixer
(``ssm_in``) and into attention (``attention_in``); the keys after k_proj
(``key``: after RoPE here, which is linear); the mixer's and attention's
outputs (``ssm_out``, ``attention_out``); gate_proj's output before the
activation and down_proj's output (``mlp_gate``, ``mlp_down``); the logits.
In_proj's per-part factors (``ssm_multipliers``) are the mixer's own
(``Mamba2Shape.in_proj_scales``).

LoRA adapters apply to attention, the MLP and the mixer's ``in_proj`` (PEFT
puts none on a Falcon-H1 ``out_proj``), each delta added to its
projection's output before the multipliers that follow it, as PEFT adds it.
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.layers import MLP, Attention, ShardSlot
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.mamba2 import Mamba2Mixer
from splitserve.kernels.lora import LoraMeta


class FalconH1Attention(Attention):
    """Llama attention with the keys multiplied by ``key_multiplier``."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix)
        self.key_scale = cfg.options.falcon_h1.key

    def position_qk(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    cos_sin_cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k * self.key_scale


class FalconH1MLP(MLP):
    """SwiGLU with gate_proj's output multiplied before the activation and
    down_proj's output after it (``mlp_multipliers``); an adapter's deltas
    join each projection's output before its multiplier, as PEFT's do."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, prefix: str):
        super().__init__(cfg, dtype, device, prefix=prefix)
        self.gate_scale, self.down_scale = cfg.options.falcon_h1.mlp_gate, cfg.options.falcon_h1.mlp_down

    def forward(self, x: torch.Tensor, lora: LoraMeta | None = None) -> torch.Tensor:
        adapted = lora is not None and self.gate_up_lora is not None
        gate_up = self.gate_up_proj(x)
        if adapted:
            self.gate_up_lora.add_to(gate_up, x, lora)
        gate, up = gate_up.split([self.intermediate, self.intermediate], dim=-1)
        act = self.act_and_mul(torch.cat([gate * self.gate_scale, up], dim=-1))
        out = self.down_proj(act)
        if adapted:
            self.down_lora.add_to(out, act, lora)
        return out * self.down_scale


class FalconH1DecoderLayer(DecoderLayer):
    """Mamba-2 and attention in parallel, then the MLP."""

    attention_class = FalconH1Attention

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, prefix: str, state_index: int):
        mlp = FalconH1MLP(cfg, dtype, device, prefix=f"{prefix}.feed_forward")
        super().__init__(cfg, dtype, device, 0, mlp=mlp, mlp_name="feed_forward", prefix=prefix)
        self.mamba = Mamba2Mixer(cfg, dtype, device, state_index)
        self.mamba.lora_projections = ("in_proj",)  # out_proj takes none (as PEFT refuses it)
        self.scales = cfg.options.falcon_h1

    def attend(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
               layer_cache: torch.Tensor, meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None,
               lora: LoraMeta | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The input norm, then the mixer's and attention's scaled outputs summed
        (the residual add fused into the next norm, as ``DecoderLayer``'s)."""
        if residual is None:
            residual = x
            h, _ = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        s = self.scales
        ssm = self.mamba(positions, h * s.ssm_in, None, meta, lora=lora)
        attn = self.self_attn(positions, h * s.attention_in, layer_cache, meta, cos_sin_cache, lora)
        return ssm * s.ssm_out + attn * s.attention_out, residual

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """LoRA stacks on attention, the MLP and the Mamba-2 mixer."""
        return {**self.self_attn.enable_lora(num_slots, max_rank), **self.mlp.enable_lora(num_slots, max_rank),
                **self.mamba.enable_lora(num_slots, max_rank)}

    def quantize_fp8_(self) -> None:
        super().quantize_fp8_()
        self.mamba.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        """The decoder's slots by Falcon-H1's names (``pre_ff_layernorm`` before the
        MLP) and the mixer's under ``mamba``."""
        slots = {name.replace(".post_attention_layernorm.", ".pre_ff_layernorm."): slot
                 for name, slot in super().weight_slots(prefix).items()}
        return {**slots, **self.mamba.weight_slots(f"{prefix}.mamba")}


class FalconH1CausalLM(HybridCausalLM):
    takes_lora = True  # checked against PEFT (tests/unit/test_lora_engine.py)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return FalconH1DecoderLayer(self.cfg, dtype, device, f"model.layers.{index}",
                                    self.cfg.options.hybrid.state_index(index))

    def state_mixer(self, index: int) -> torch.nn.Module:
        return self.layers[index].mamba

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids) * self.cfg.options.falcon_h1.embedding

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.cfg.options.falcon_h1.lm_head
