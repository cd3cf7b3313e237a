"""BioGPT: OPT's decoder (pre-norm layers with LayerNorm, the plain ``fc1`` /
``fc2`` MLP, a learned position table whose position 0 is row 2) with
token embeddings scaled by ``sqrt(hidden_size)`` (``ScaledOPTCausalLM``;
``FamilyOptions`` from ``splitserve.engine.dialects.biogpt``).

Checkpoint names are mapped at load: ``biogpt.*`` -> ``model.*``
(``embed_tokens``, ``embed_positions``, ``layers.N`` with OPT's layer names,
mapped by ``OPTCausalLM``), ``biogpt.layer_norm`` -> ``model.norm``,
``output_projection`` -> ``lm_head`` (tied to the token embeddings by
default).
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.mapped import renamed
from splitserve.engine.models.xglm import ScaledOPTCausalLM

_RENAMES = (("biogpt.layer_norm.", "model.norm."), ("biogpt.", "model."),
            ("output_projection.", "lm_head."))


class BioGptCausalLM(ScaledOPTCausalLM):
    """BioGPT (``BioGptForCausalLM``): OPT's model with scaled embeddings,
    names mapped at load."""

    lora_refusal = ("LoRA adapters are not supported for BioGPT checkpoints (its layers' norms "
                    "and MLP are renamed at load; adapters do not map onto them)")

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        return super().mapped(renamed(name, _RENAMES), tensor)
