"""Falcon-H1's scalar multipliers, read from config.json by its dialect and
held in ``FamilyOptions.falcon_h1``; ``splitserve.engine.models.falcon_h1``
applies them where transformers' FalconH1 model does."""

from __future__ import annotations

from dataclasses import dataclass

PARALLEL_KIND = "mamba2_attention"  # a Falcon-H1 layer: Mamba-2 and attention side by side


@dataclass(frozen=True)
class FalconH1Scales:
    """``embedding``: the embeddings' factor; ``lm_head``: the logits';
    ``attention_in`` / ``ssm_in``: the normed input's factor on its way into
    attention / the Mamba-2 mixer; ``attention_out`` / ``ssm_out``: their
    outputs' before they are summed; ``key``: the keys' (after k_proj);
    ``mlp_gate`` / ``mlp_down``: gate_proj's output before the activation,
    down_proj's output."""

    embedding: float = 1.0
    lm_head: float = 1.0
    attention_in: float = 1.0
    attention_out: float = 1.0
    key: float = 1.0
    ssm_in: float = 1.0
    ssm_out: float = 1.0
    mlp_gate: float = 1.0
    mlp_down: float = 1.0
