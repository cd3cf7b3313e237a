"""GLM-4.5 / 4.6 (``Glm4MoeForCausalLM``): the mixture-of-experts decoder
of ``splitserve.engine.models.moe`` with the grouped sigmoid router
(``MoEConfig.grouped_sigmoid``), ungated shared experts, dense first layers
and partial rotate-half RoPE, all from ``ModelConfig``
(``splitserve.engine.dialects.glm4_moe``).

What this class adds: GLM-4.5 checkpoints store their multi-token-prediction
layers (``num_nextn_predict_layers``, ``FamilyOptions.mtp_layers``) as the
decoder layers after the last, ``model.layers.{num_hidden_layers + i}.*``;
they are skipped at load, as transformers skips them.
"""

from __future__ import annotations

from splitserve.engine.models.moe import MoECausalLM


class Glm4MoeCausalLM(MoECausalLM):
    def _skipped(self, name: str) -> bool:
        if super()._skipped(name):
            return True
        n = self.cfg.num_layers
        return any(name.startswith(f"model.layers.{i}.") for i in range(n, n + self.cfg.options.mtp_layers))
