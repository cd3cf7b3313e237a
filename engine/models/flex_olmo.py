"""FlexOlmo (``FlexOlmoForCausalLM``): OLMo 2's decoder layer
(``splitserve.engine.models.olmo2.Olmo2DecoderLayer``: norms on the
attention and MLP outputs, none before them, q/k norms over all heads) with
OLMoE's sparse MLP (``splitserve.engine.models.moe.SparseMoeBlock``: softmax
router, top-k experts) in every layer. Its all-head q/k norms split
across tensor-parallel ranks as OLMo 2's."""

from __future__ import annotations

from splitserve.engine.models.moe import MoECausalLM
from splitserve.engine.models.olmo2 import Olmo2DecoderLayer


class FlexOlmoCausalLM(MoECausalLM):
    layer_class = Olmo2DecoderLayer
