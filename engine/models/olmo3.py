"""OLMo 3: OLMo 2's decoder with sliding windows and a RoPE per layer type.

Everything of OLMo 2 (``splitserve.engine.models.olmo2``): norms on the
attention and MLP outputs, none before them; q/k RMSNorms over all heads
at once, split across tensor-parallel ranks as OLMo 2's. What
it adds (``splitserve.engine.dialects.olmo3``):

- the layers ``layer_types`` marks ``sliding_attention`` attend to the last
  ``sliding_window`` tokens (``ModelConfig.layer_windows``), the others to
  the whole context;
- the sliding layers rotate with their own base, unscaled (a second cos/sin
  table, built as Gemma 3's: ``local_rope_config``); the full-attention
  layers with the model's main table (its base and any scaling, e.g. YaRN).
"""

from __future__ import annotations

from splitserve.engine.models.gemma3 import LocalRopeLayers
from splitserve.engine.models.olmo2 import Olmo2CausalLM


class Olmo3CausalLM(LocalRopeLayers, Olmo2CausalLM):
    """OLMo 3 (``Olmo3ForCausalLM``): a second cos/sin table for the sliding layers."""
