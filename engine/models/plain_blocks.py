"""The blocks of the GPT-style families (StarCoder2, Phi, StableLM, GPT-NeoX) that the
Llama-style decoder lacks, as options it takes (``FamilyOptions``):

- ``splitserve.engine.models.layers.LayerNorm``: mean and variance, a weight
  and a bias, in place of RMSNorm (``FamilyOptions.layer_norm``; ``model_norm``
  picks it), with the same fused residual add;
- ``PlainMLP``: up -> activation -> down, no gate (``FamilyOptions.plain_mlp``
  names the two projections in checkpoints);
- ``ParallelDecoderLayer``: attention and MLP both read the same normed input
  and both outputs join the residual stream at once
  (``FamilyOptions.parallel_residual``).

LayerNorm and the plain MLP's activation run as torch ops on every device:
the kernel registry (``splitserve.kernels.dispatch``) has RMSNorm and the
gated activations only, so no Triton kernel computes these.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import Linear, ShardSlot, linear_slots, norm_slots
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.quantization import layer_groups
from splitserve.kernels.lora import LoraMeta

# FamilyOptions.hidden_act -> the plain MLP's activation
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,  # erf
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),  # Nemotron, Arcee
}


class PlainMLP(nn.Module):
    """``down(act(up(x)))`` with optional biases; checkpoint names from
    ``FamilyOptions.plain_mlp`` (StarCoder2 c_fc/c_proj, Phi fc1/fc2). Takes
    LoRA adapters on up and down once its layer calls ``enable_lora``
    (``DecoderLayer.enable_lora``, Nemotron-H's MLP blocks)."""

    takes_lora = True  # DecoderLayer enables its stacks and passes it the tokens' slots

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, prefix: str,
                 act: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``act``: the activation where ``hidden_act`` names none of the plain
        ones (Apertus' xIELU with its learned scalars)."""
        super().__init__()
        self.up_name, self.down_name = cfg.options.plain_mlp
        self.quant = cfg.quantization
        hidden, i = cfg.hidden_size, cfg.intermediate_size
        self.act = act or _ACTIVATIONS[cfg.options.hidden_act]
        self.dtype = dtype
        self.up_lora: LoraStack | None = None  # enable_lora
        self.down_lora: LoraStack | None = None
        self.up_proj = Linear(hidden, i, cfg.mlp_bias, dtype, device, fp8_groups=layer_groups(
            self.quant, [(f"{prefix}.{self.up_name}.weight", i)], hidden))
        self.down_proj = Linear(i, hidden, cfg.mlp_bias, dtype, device, fp8_groups=layer_groups(
            self.quant, [(f"{prefix}.{self.down_name}.weight", hidden)], i))

    def forward(self, x: torch.Tensor, lora: LoraMeta | None = None) -> torch.Tensor:
        if lora is None or self.up_lora is None:
            return self.down_proj(self.act(self.up_proj(x)))
        act = self.act(self.up_lora.add_to(self.up_proj(x), x, lora))
        return self.down_lora.add_to(self.down_proj(act), act, lora)

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """LoRA stacks on up and down, by their names in ``FamilyOptions.plain_mlp``."""
        dev, hidden, i = self.up_proj.weight.device, self.up_proj.in_features, self.up_proj.out_features
        self.up_lora = LoraStack(hidden, (i,), num_slots, max_rank, self.dtype, dev)
        self.down_lora = LoraStack(i, (hidden,), num_slots, max_rank, self.dtype, dev)
        return {self.up_name: (self.up_lora, 0), self.down_name: (self.down_lora, 0)}

    def quantize_fp8_(self) -> None:
        self.up_proj.quantize_fp8_()
        self.down_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = linear_slots(self.up_proj, [(f"{prefix}.{self.up_name}", 0, self.up_proj.out_features)],
                             self.quant)
        slots.update(linear_slots(self.down_proj, [(f"{prefix}.{self.down_name}", 0,
                                                    self.down_proj.out_features)], self.quant))
        return slots


class ParallelDecoderLayer(DecoderLayer):
    """``x + attn(norm(x)) + mlp(norm(x))``: one input norm, no
    post-attention norm (Phi; StableLM with use_parallel_residual), or with
    ``FamilyOptions.parallel_mlp_norm`` the MLP's own norm of the same x
    (GPT-NeoX's ``post_attention_layernorm``). Returns ``attn + mlp`` and
    the stream apart; the next norm adds them, in transformers' order
    (attention + MLP first, then the residual; a + m and m + a are the
    same float). ``attn_into_residual``: the attention output joins the
    residual first, ``(x + attn) + mlp``, as Cohere sums them (in bf16 the
    two orders round differently)."""

    attn_into_residual = False

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0, mlp: nn.Module | None = None, prefix: str = ""):
        super().__init__(cfg, dtype, device, sliding_window, mlp=mlp, prefix=prefix)
        if not cfg.options.parallel_mlp_norm:
            self.post_attention_layernorm = None

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,  # [T, hidden]; None before layer 0
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor | None,
        lora: LoraMeta | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            h, _ = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        attn = self.self_attn(positions, h, layer_cache, meta, cos_sin_cache, lora)
        if self.tp is not None:
            attn = self.tp.all_reduce(attn)
        if self.post_attention_layernorm is not None:
            h, _ = self.post_attention_layernorm(residual)
        if self.attn_into_residual:
            return self.feed_forward(h, lora), residual + attn
        return attn + self.feed_forward(h, lora), residual

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        norms = norm_slots(f"{prefix}.input_layernorm", self.input_layernorm)
        if self.post_attention_layernorm is not None:
            norms.update(norm_slots(f"{prefix}.post_attention_layernorm", self.post_attention_layernorm))
        return {
            **norms,
            **self.self_attn.weight_slots(f"{prefix}.self_attn"),
            **self.mlp.weight_slots(f"{prefix}.{self.mlp_name}"),
        }
