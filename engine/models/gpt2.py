"""GPT-2: the dense decoder with LayerNorm, the ungated MLP (``c_fc`` /
``c_proj``, biased) and a learned absolute position table in place of RoPE
(``FamilyOptions``, from ``splitserve.engine.dialects.gpt2``).

Its checkpoints name things their own way; ``GPT2CausalLM`` maps them at
load onto the shared decoder's slots: ``transformer.wte`` ->
``model.embed_tokens``, ``transformer.wpe`` -> ``model.embed_positions``,
``transformer.h.N`` -> ``model.layers.N`` (``ln_1`` / ``ln_2`` ->
``input_layernorm`` / ``post_attention_layernorm``, ``attn`` ->
``self_attn``, its ``c_proj`` -> ``o_proj``), ``transformer.ln_f`` ->
``model.norm``. Exports of the bare ``GPT2Model`` (the original OpenAI
checkpoints) carry the same names without ``transformer.``. Their Conv1D
weights are stored [in, out] and are transposed; the fused ``attn.c_attn``
holds [q | k | v] along its output dim and is split into q/k/v_proj. Older
exports' causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are
skipped. The LM head is tied to ``wte`` unless config.json says otherwise.
LoRA adapters on c_attn, c_proj, c_fc and mlp.c_proj are served, c_attn's
lora_B split as its weight is (``splitserve.engine.lora.mapped_layout``).
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.mapped import MappedCausalLM, renamed

_RENAMES = (  # checkpoint prefix (after ``transformer.``) -> the shared decoder's
    ("wte.", "model.embed_tokens."),
    ("wpe.", "model.embed_positions."),
    ("ln_f.", "model.norm."),
    ("h.", "model.layers."),
)
_LAYER_RENAMES = ((".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                  (".attn.c_proj.", ".self_attn.o_proj."), (".attn.", ".self_attn."))
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
_CONV1D = (".c_attn.weight", ".o_proj.weight", ".c_fc.weight", ".c_proj.weight")


class GPT2CausalLM(MappedCausalLM):
    """GPT-2 (``GPT2LMHeadModel``): checkpoint names and layouts mapped at load."""

    conv1d_weights = _CONV1D  # the weights stored [in, out]; families of nn.Linear name none

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        if cfg.options.inverse_layer_attn_scale:  # as GPT2Attention.scaling, layer by layer
            for i, layer in enumerate(self.layers):
                layer.self_attn.scale /= float(i + 1)

    def split_qkv(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """``c_attn`` (already [3 * hidden, ...]) as q_proj, k_proj, v_proj."""
        hidden = self.cfg.hidden_size
        if tensor.dim() < 1 or tensor.shape[0] != 3 * hidden:
            raise CheckpointError(f"tensor {name!r}: expected {3 * hidden} outputs (q, k, v of "
                                  f"{hidden}), got shape {list(tensor.shape)}")
        base, _, kind = name.rpartition(".c_attn.")
        for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.split(hidden)):
            yield f"{base}.{part}.{kind}", rows

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.endswith(_MASK_BUFFERS):
            return
        name = renamed(name.removeprefix("transformer."), _RENAMES, _LAYER_RENAMES, count=1)
        if name.startswith("model.layers.") and name.endswith(self.conv1d_weights) and tensor.dim() == 2:
            tensor = tensor.t()  # Conv1D: [in, out]
        if ".c_attn." in name:
            yield from self.split_qkv(name, tensor)
        else:
            yield name, tensor
