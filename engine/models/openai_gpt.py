"""OpenAI GPT (GPT-1): GPT-2's checkpoint layout (Conv1D weights stored
[in, out], the fused ``c_attn``, learned positions) in OPT-350m's post-norm
layers (``PostNormDecoderLayer``: ``x = ln_1(x + attn(x))``, then
``x = ln_2(x + mlp(x))``), with no final norm (``FamilyOptions`` from
``splitserve.engine.dialects.openai_gpt``).

Checkpoint names are mapped at load onto GPT-2's (``tokens_embed`` ->
``wte``, ``positions_embed`` -> ``wpe``), then as ``GPT2CausalLM`` maps
them; exports of the bare ``OpenAIGPTModel`` carry the same names without
``transformer.``. The LM head is tied to the token embeddings by default.
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gpt2 import GPT2CausalLM
from splitserve.engine.models.mapped import renamed
from splitserve.engine.models.opt import PostNormDecoderLayer
from splitserve.engine.models.plain_blocks import PlainMLP

_RENAMES = (("tokens_embed.", "wte."), ("positions_embed.", "wpe."))


class OpenAIGPTCausalLM(GPT2CausalLM):
    """OpenAI GPT (``OpenAIGPTLMHeadModel``): GPT-2's loading, post-norm layers."""

    lora_refusal = ("LoRA adapters are not supported for OpenAI GPT checkpoints (its fused c_attn "
                    "and Conv1D projections have no q/k/v/o_proj to adapt)")

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        mlp = PlainMLP(self.cfg, dtype, device, prefix=f"{prefix}.mlp")
        return PostNormDecoderLayer(self.cfg, dtype, device, window, mlp=mlp, prefix=prefix)

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield from super().mapped(renamed(name.removeprefix("transformer."), _RENAMES), tensor)
