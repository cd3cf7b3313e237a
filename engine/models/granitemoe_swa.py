"""GraniteMoeSWA (``GraniteMoeSWAForCausalLM``): GraniteMoeShared's layers
(``splitserve.engine.models.granitemoe``: Granite's multipliers, the
experts, the dense ``shared_mlp`` beside them) with Granite SWA's attention
(``splitserve.engine.models.granite_swa``: windows per ``layer_types``,
sinks, a RoPE base per layer).

Its checkpoints store each layer's experts as transformers 5 holds them,
which ``renamed`` maps onto GraniteMoE's fused names before they are split
(``GraniteMoeCausalLM.split``):

- ``block_sparse_moe.experts.gate_up_proj`` [E, 2I, hidden], rows
  [gate | up] per expert -> ``block_sparse_moe.input_linear.weight``;
- ``block_sparse_moe.experts.down_proj`` [E, hidden, I] ->
  ``block_sparse_moe.output_linear.weight``;
- ``block_sparse_moe.router.weight`` -> ``block_sparse_moe.router.layer.weight``.

``shared_mlp.input_linear`` / ``output_linear`` keep their names.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.models.granite_swa import LayerRopeThetas
from splitserve.engine.models.granitemoe import GraniteMoeCausalLM
from splitserve.engine.models.mapped import renamed

_MOE_RENAMES = ((".block_sparse_moe.experts.gate_up_proj", ".block_sparse_moe.input_linear.weight"),
                (".block_sparse_moe.experts.down_proj", ".block_sparse_moe.output_linear.weight"),
                (".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight"))


class GraniteMoeSwaCausalLM(LayerRopeThetas, GraniteMoeCausalLM):
    """GraniteMoeSWA (``GraniteMoeSWAForCausalLM``): transformers 5's expert
    names mapped onto GraniteMoE's, per-layer RoPE bases."""

    def renamed(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return super().renamed((renamed(name, (), _MOE_RENAMES), t) for name, t in weights)
