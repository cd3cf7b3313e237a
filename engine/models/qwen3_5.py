"""Qwen3.5 (``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM`` and the text
models of their ``ForConditionalGeneration`` wrappers): Qwen3-Next's layers
(``splitserve.engine.models.qwen3_next``) with the Gated DeltaNet's
projections stored apart (``GatedDeltaNetShape(fused_projections=False)``).

At load: the wrappers' (and some text-only exports') ``model.language_model.``
names read as ``model.``; the vision tower (``model.visual.``) and the
multi-token-prediction layers (``mtp.``), which transformers skips too, are
skipped; experts stored fused (``mlp.experts.gate_up_proj`` [E, 2I, hidden],
rows [gate | up], and ``mlp.experts.down_proj`` [E, hidden, I]) split per
expert.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.mapped import MappedCausalLM
from splitserve.engine.models.qwen3_next import Qwen3NextForCausalLM

_WRAPPED_PREFIX = "model.language_model."
_SKIPPED_PREFIXES = ("model.visual.", "mtp.")
_FUSED_EXPERTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


class Qwen3_5ForCausalLM(MappedCausalLM, Qwen3NextForCausalLM):
    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.startswith(_SKIPPED_PREFIXES):
            return ()
        if name.startswith(_WRAPPED_PREFIX):
            name = "model." + name[len(_WRAPPED_PREFIX):]
        if name.endswith(_FUSED_EXPERTS):
            return self.split_experts(name, tensor)
        return ((name, tensor),)

    def split_experts(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """A fused [E, 2I, hidden] gate_up_proj or [E, hidden, I] down_proj ->
        each expert's gate_proj / up_proj [I, hidden] or down_proj [hidden, I]."""
        cfg = self.cfg if self.tp is None else self.tp.plan.cfg  # the whole model's sizes
        moe = cfg.moe
        if moe is None:
            raise CheckpointError(f"{name}: experts in a checkpoint of a model without them")
        e, i, h = moe.num_experts, moe.expert_intermediate_size, cfg.hidden_size
        gate_up = name.endswith("gate_up_proj")
        want = (e, 2 * i, h) if gate_up else (e, h, i)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {want}")
        base = name.rsplit(".", 1)[0]
        for j in range(e):
            if gate_up:
                yield f"{base}.{j}.gate_proj.weight", tensor[j, :i]
                yield f"{base}.{j}.up_proj.weight", tensor[j, i:]
            else:
                yield f"{base}.{j}.down_proj.weight", tensor[j]
