"""OPT: the dense decoder with LayerNorm, the ungated MLP (``fc1`` / ``fc2``,
ReLU by default) and a learned absolute position table whose first two
rows are unused (position p is row p + 2), in place of RoPE
(``FamilyOptions``, from ``splitserve.engine.dialects.opt``).

OPT-350m differs twice, both as transformers' OPTDecoder computes it: its
norms follow each block's residual add (``do_layer_norm_before: false``:
``PostNormDecoderLayer``), with no final norm, and its token embeddings
and LM head are ``word_embed_proj_dim`` wide, mapped to hidden_size by
``project_in`` after the embedding and back by ``project_out`` before the
LM head. ``_remove_final_layer_norm`` drops the final norm alone.

Its checkpoints' names are mapped at load onto the shared decoder's slots:
``model.decoder.embed_tokens`` / ``embed_positions`` / ``project_in`` /
``project_out`` -> ``model.*``, ``model.decoder.layers.N`` ->
``model.layers.N`` (``self_attn_layer_norm`` / ``final_layer_norm`` ->
``input_layernorm`` / ``post_attention_layernorm``, ``fc1`` / ``fc2`` ->
``mlp.fc1`` / ``mlp.fc2``; the attention keeps ``q/k/v_proj`` and
``out_proj``), ``model.decoder.final_layer_norm`` -> ``model.norm``.
Exports of the bare ``OPTModel`` (the original facebook/opt checkpoints)
carry the same names without ``model.``. The LM head is tied to the token
embeddings by default.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param
from splitserve.engine.models.mapped import MappedCausalLM, renamed
from splitserve.engine.models.plain_blocks import PlainMLP
from splitserve.kernels.lora import LoraMeta

_RENAMES = (  # checkpoint prefix -> the shared decoder's (first match wins)
    ("decoder.final_layer_norm.", "model.norm."),
    ("decoder.layers.", "model.layers."),
    ("decoder.", "model."),  # embed_tokens, embed_positions, project_in, project_out
)
_LAYER_RENAMES = ((".self_attn_layer_norm.", ".input_layernorm."),
                  (".final_layer_norm.", ".post_attention_layernorm."),
                  (".fc1.", ".mlp.fc1."), (".fc2.", ".mlp.fc2."))


class PostNormDecoderLayer(DecoderLayer):
    """OPT-350m's layer: ``x = ln1(x + attn(x))``, then ``x = ln2(x + mlp(x))``.
    Its output is the whole stream, so it returns no separate residual (and
    takes none: the previous layer returned None too). At tensor
    parallelism each block's partial sums are reduced before the add."""

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,  # always None
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor | None,
        lora: LoraMeta | None = None,
    ) -> tuple[torch.Tensor, None]:
        h = self.self_attn(positions, x, layer_cache, meta, cos_sin_cache, lora)
        if self.tp is not None:  # the rank's partial sums, whole before the add
            h = self.tp.all_reduce(h)
        x, _ = self.input_layernorm(h, x)
        x, _ = self.post_attention_layernorm(self.feed_forward(x, lora), x)
        return x, None


class OPTCausalLM(MappedCausalLM):
    """OPT (``OPTForCausalLM``): checkpoint names mapped at load; OPT-350m's
    post-block norms and embedding projections."""

    lora_refusal = ("LoRA adapters are not supported for OPT checkpoints (its projections sit "
                    "under model.decoder.layers, which adapters do not map onto)")

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        proj = cfg.options.embed_proj_dim
        self.project_in = self.project_out = None
        if proj:
            self.embed_tokens = empty_param(cfg.vocab_size, proj, dtype=dtype, device=device)
            if self.lm_head is not None:
                self.lm_head = empty_param(cfg.vocab_size, proj, dtype=dtype, device=device)
            self.project_in = Linear(proj, cfg.hidden_size, False, dtype, device)
            self.project_out = Linear(cfg.hidden_size, proj, False, dtype, device)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        if not self.cfg.options.norm_after_block:
            return super().build_layer(index, window, dtype, device)
        prefix = f"model.layers.{index}"
        mlp = PlainMLP(self.cfg, dtype, device, prefix=f"{prefix}.mlp")
        return PostNormDecoderLayer(self.cfg, dtype, device, window, mlp=mlp, prefix=prefix)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids)
        return x if self.project_in is None else self.project_in(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden if self.project_out is None else self.project_out(hidden))

    def weight_slots(self) -> dict[str, ShardSlot]:
        slots = super().weight_slots()
        if self.project_in is not None:
            slots["model.project_in.weight"] = ShardSlot(self.project_in.weight)
            slots["model.project_out.weight"] = ShardSlot(self.project_out.weight)
        return slots

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        bare = name.removeprefix("model.")
        name = renamed(bare, _RENAMES) if bare.startswith(tuple(p for p, _ in _RENAMES)) else name
        if name.startswith("model.layers."):
            name = renamed(name, (), _LAYER_RENAMES, count=1)
        return ((name, tensor),)
