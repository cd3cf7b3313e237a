"""AFMoE (Arcee Trinity: ``AfmoeForCausalLM``), as transformers'
``modeling_afmoe`` computes it (``splitserve.engine.dialects.afmoe`` reads
its config.json):

- attention (``AfmoeAttention``): per-head q/k RMSNorms before RoPE (Qwen3's),
  RoPE on the sliding layers only (the full-attention layers are NoPE, as
  SmolLM3's: ``rope_table``), then the attention output, [T, heads * head_dim],
  multiplied by ``sigmoid(gate_proj(x))`` of the layer's normed input before
  ``o_proj``;
- four RMSNorms a layer, Gemma 2's sandwich (``Gemma2DecoderLayer``): the
  checkpoint's ``pre_mlp_layernorm`` / ``post_mlp_layernorm`` load into its
  ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``;
- the sparse layers (``MoECausalLM``): GLM-4.5's sigmoid router as one group
  with its bias, plus an ungated shared MLP; the checkpoint's
  ``mlp.router.gate`` and ``mlp.expert_bias`` load into the router's
  ``mlp.gate`` and ``mlp.gate.e_score_correction_bias``;
- with ``mup_enabled`` the embeddings multiplied by sqrt(hidden_size).

LoRA adapters are refused (the attention's gate takes none).
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.attention import AttentionMetadata, paged_attention_layer
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gemma import Gemma2DecoderLayer
from splitserve.engine.models.layers import Attention, Linear, ShardSlot, linear_slots, model_norm
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.moe import MoECausalLM
from splitserve.engine.models.rope import apply_rotary
from splitserve.engine.models.smollm3 import SmolLM3CausalLM
from splitserve.engine.quantization import layer_groups
from splitserve.kernels.lora import LoraMeta

# checkpoint name part -> the shared decoder's
_RENAMES = ((".pre_mlp_layernorm.", ".pre_feedforward_layernorm."),
            (".post_mlp_layernorm.", ".post_feedforward_layernorm."),
            (".mlp.router.gate.", ".mlp.gate."),
            (".mlp.expert_bias", ".mlp.gate.e_score_correction_bias"))


class AfmoeAttention(Attention):
    """Qwen3's attention with its output gated per dim by ``sigmoid(gate_proj(x))``."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix)
        self.gate_proj = Linear(cfg.hidden_size, self.q_size, False, dtype, device,
                                fp8_groups=layer_groups(self.quant, [(f"{prefix}.gate_proj.weight", self.q_size)],
                                                        cfg.hidden_size))

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        layer_cache: torch.Tensor,  # [2, NB, BS, Hk, D]
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor | None,  # None: a full-attention (NoPE) layer
        lora: LoraMeta | None = None,  # refused for AFMoE (AfmoeCausalLM.enable_lora)
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim).contiguous()
        k = k.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        v = v.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        q, k = self.norm_qk(q, k)
        if cos_sin_cache is not None:
            q, k = apply_rotary(positions, q, k, cos_sin_cache, self.float_rope)
        out = paged_attention_layer(q, k, v, layer_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(t, self.q_size) * torch.sigmoid(self.gate_proj(x)))

    def quantize_fp8_(self) -> None:
        super().quantize_fp8_()
        self.gate_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        slots.update(linear_slots(self.gate_proj, [(f"{prefix}.gate_proj", 0, self.q_size)], self.quant))
        return slots


class AfmoeDecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's sandwich layer with AFMoE's gated attention and a dense MLP
    or the experts (``mlp``)."""

    attention_class = AfmoeAttention

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 mlp: torch.nn.Module | None = None, mlp_name: str = "mlp", prefix: str = ""):
        DecoderLayer.__init__(self, cfg, dtype, device, sliding_window, mlp=mlp, mlp_name=mlp_name,
                              prefix=prefix)
        self.pre_feedforward_layernorm = model_norm(cfg, cfg.hidden_size, dtype, device)
        self.post_feedforward_layernorm = model_norm(cfg, cfg.hidden_size, dtype, device)


class AfmoeCausalLM(SmolLM3CausalLM, MoECausalLM):
    """AFMoE: ``AfmoeDecoderLayer`` layers, NoPE full-attention layers,
    checkpoint names mapped at load."""

    layer_class = AfmoeDecoderLayer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids)
        scale = self.cfg.options.embed_scale  # mup_enabled: a Python float, as transformers multiplies
        return x if scale == 1.0 else x * scale

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError("LoRA adapters are not supported for AFMoE checkpoints (its attention "
                              "output gate_proj takes none)")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((_renamed(name), tensor) for name, tensor in weights)


def _renamed(name: str) -> str:
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name
