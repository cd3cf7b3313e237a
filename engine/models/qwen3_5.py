"""Qwen3.5 (``Qwen3_5ForCausalLM`` and the text
model of its ``ForConditionalGeneration`` wrapper): Qwen3-Next's layers
(``splitserve.engine.models.qwen3_next``) with the Gated DeltaNet's
projections stored apart (``GatedDeltaNetShape(fused_projections=False)``).

At load: the wrappers' (and some text-only exports') ``model.language_model.``
names read as ``model.``; the vision tower (``model.visual.``) and the
multi-token-prediction layers (``mtp.``), which transformers skips too, are
skipped.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.mapped import MappedCausalLM
from splitserve.engine.models.qwen3_next import Qwen3NextForCausalLM

_WRAPPED_PREFIX = "model.language_model."
_SKIPPED_PREFIXES = ("model.visual.", "mtp.")


class Qwen3_5ForCausalLM(MappedCausalLM, Qwen3NextForCausalLM):
    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.startswith(_SKIPPED_PREFIXES):
            return ()
        if name.startswith(_WRAPPED_PREFIX):
            name = "model." + name[len(_WRAPPED_PREFIX):]
        return ((name, tensor),)
