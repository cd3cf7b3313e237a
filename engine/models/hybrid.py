"""The forward of a hybrid model: attention layers read and write their
slice of the paged KV cache; recurrent layers (``FamilyOptions.hybrid``)
read and write their sequences' slots in the recurrent-state store, bound
once by the model runner (``bind_state``)."""

from __future__ import annotations

from typing import Callable

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.state_cache import RecurrentState
from splitserve.kernels.lora import LoraMeta


class HybridCausalLM(CausalLM):
    """``CausalLM`` whose layers ``cfg.options.hybrid`` marks recurrent keep a
    state in place of a KV cache slice; their mixers take ``bind``.
    ``takes_lora``: whether the family serves LoRA adapters (its layer kinds
    checked against PEFT)."""

    takes_lora = False

    def bind_state(self, state: RecurrentState) -> None:
        """Give every recurrent layer the runner's state store."""
        layout = self.cfg.options.hybrid
        for i in layout.state_layers:
            self.state_mixer(i).bind(state)

    def state_mixer(self, index: int) -> torch.nn.Module:
        """Recurrent layer ``index``'s mixer, the module that keeps its state
        (the layer's ``self_attn``; Falcon-H1's ``mamba`` beside attention)."""
        return self.layers[index].self_attn

    @property
    def keeps_verify_states(self) -> bool:
        """Whether every recurrent layer keeps its per-token states of a verify
        chunk (``RecurrentState.keep``): what speculative decoding needs to
        roll rejected drafts back."""
        return all(getattr(self.state_mixer(i), "keeps_verify_states", False)
                   for i in self.cfg.options.hybrid.state_layers)

    def enable_lora(self, num_slots: int, max_rank: int):
        """LoRA stacks on the attention layers' and dense MLPs' projections and
        on the recurrent mixers' (``RecurrentMixer.enable_lora``), in the
        families that set ``takes_lora`` (Qwen3-Next, Qwen3.5, OLMo Hybrid and the
        Mamba-2 hybrids of ``splitserve.engine.lora.hybrid_layout``); the others refuse."""
        if not self.takes_lora:
            raise CheckpointError(f"LoRA adapters are not supported for {self.cfg.architecture} (a hybrid "
                                  "model: LoRA on hybrids is served for Qwen3-Next, Qwen3.5, OLMo Hybrid and the "
                                  "Mamba-2 hybrids only)")
        return super().enable_lora(num_slots, max_rank)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [attention layers, 2, NB, BS, Hk, D]
        meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None = None,
        lora: LoraMeta | None = None,
    ) -> torch.Tensor:
        layout = self.cfg.options.hybrid
        if kv_cache.shape[0] != layout.num_cache_layers:
            raise ValueError(f"kv_cache has {kv_cache.shape[0]} layers, the model caches "
                             f"{layout.num_cache_layers}")
        x = self.embed(input_ids)
        residual = None
        cached = 0
        attending = set(layout.attention_layers)
        for i, layer in enumerate(self.layers):
            attends = i in attending
            cache = kv_cache[cached] if attends else None
            x, residual = layer(positions, x, residual, cache, meta, self.rope_table(i), lora)
            if attends:
                if on_layer_done is not None:
                    on_layer_done(cached)  # cache layer ``cached`` is complete
                cached += 1
        x, _ = self.norm(x, residual)
        return x
