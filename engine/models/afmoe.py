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

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gated_attention import GatedAttention
from splitserve.engine.models.gemma import Gemma2DecoderLayer
from splitserve.engine.models.layers import model_norm
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.moe import MoECausalLM
from splitserve.engine.models.smollm3 import SmolLM3CausalLM

# checkpoint name part -> the shared decoder's
_RENAMES = ((".pre_mlp_layernorm.", ".pre_feedforward_layernorm."),
            (".post_mlp_layernorm.", ".post_feedforward_layernorm."),
            (".mlp.router.gate.", ".mlp.gate."),
            (".mlp.expert_bias", ".mlp.gate.e_score_correction_bias"))


class AfmoeAttention(GatedAttention):
    """Qwen3's attention (q/k norms before RoPE; none on the NoPE layers) with its
    output gated by ``sigmoid(gate_proj(x))``, the gate without a bias."""

    gate_bias = False


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
