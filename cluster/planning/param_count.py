"""Exact parameter counts and recurrent state sizes of a model, read from the
engine's own implementation.

``count_parameters`` builds the model ``ModelConfig`` describes with
``splitserve.engine.models.build_model`` on torch's meta device (shapes
only: no memory, no weights read) and counts what the engine holds: every
family's own layers (Mamba and Gated DeltaNet mixers, MLA's latent
projections, shared experts, dense first layers, tied or untied
embeddings) without a formula per family. ``state_elements`` reads a hybrid
model's per-sequence recurrent state from its ``HybridLayout``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# parameters the model reads by index, not multiplies with: the token embedding
# (unless the output head shares it), learned positions, Gemma 4's per-layer table
LOOKUP_TABLES = ("embed_tokens", "embed_positions", "embed_tokens_per_layer")


@dataclass(frozen=True)
class ParamCount:
    """``total``: every parameter the engine holds; ``routed``: those of the
    routed experts (``num_experts`` of them, ``experts_per_token`` chosen per
    token); ``lookups``: those of tables read by index (``LOOKUP_TABLES``)."""

    total: int
    routed: int
    lookups: int
    num_experts: int
    experts_per_token: int

    @property
    def active_per_token(self) -> int:
        """Weights one token multiplies with: all but the routed experts the
        router passes over and the lookup tables (the output head counts)."""
        chosen = self.routed * self.experts_per_token // self.num_experts if self.num_experts else 0
        return self.total - self.routed + chosen - self.lookups


def routed_experts(mc) -> tuple[int, int]:
    """(experts, experts per token) a ``ModelConfig`` routes to; (0, 0): dense.
    Gemma 4's experts sit in its own options rather than ``ModelConfig.moe``."""
    if mc.moe is not None:
        return mc.moe.num_experts, mc.moe.top_k
    g = mc.options.gemma4
    if g is not None and g.num_experts:
        return g.num_experts, g.top_k
    return 0, 0


def _routed_params(model, num_experts: int) -> int:
    """Parameters of the stacked routed-expert weights: in each module (not a
    plain ``Linear``: the router's [E, hidden] weight is one) holding an
    [E, n, k] matrix stack, every parameter of two or more dimensions whose
    first is E (the stacks and gpt-oss's per-expert biases)."""
    from splitserve.engine.models.layers import Linear

    total = 0
    for module in model.modules():
        if isinstance(module, Linear):
            continue
        own = [p for _, p in module.named_parameters(recurse=False)]
        if not any(p.dim() == 3 and p.shape[0] == num_experts and min(p.shape[1:]) > 1 for p in own):
            continue
        total += sum(p.numel() for p in own if p.dim() >= 2 and p.shape[0] == num_experts)
    return total


def count_parameters(mc) -> ParamCount:
    """The parameter counts of the engine's model for ``mc`` (a
    ``splitserve.engine.config.ModelConfig``), built on the meta device.
    An fp8 checkpoint counts as its unquantized model (the same elements;
    its per-block scales are left out). Raises what ``build_model`` raises
    for a config the engine refuses."""
    import torch

    from splitserve.engine.models import build_model

    model = build_model(dataclasses.replace(mc, quantization=None), torch.float32, "meta")
    params = dict(model.named_parameters())  # a tied output head is the embedding, once
    experts, per_token = routed_experts(mc)
    lookups = sum(params[n].numel() for n in LOOKUP_TABLES if n in params)
    if mc.tie_word_embeddings and "embed_tokens" in params:
        lookups -= params["embed_tokens"].numel()  # the output head multiplies with it
    return ParamCount(total=sum(p.numel() for p in params.values()),
                      routed=_routed_params(model, experts) if experts else 0,
                      lookups=lookups, num_experts=experts, experts_per_token=per_token)


def state_elements(mc) -> tuple[int, int]:
    """A hybrid model's recurrent state per sequence over every recurrent
    layer, as (elements kept in the model's dtype, elements kept in float32)
    (``HybridLayout.states``); (0, 0) for a model without recurrent layers."""
    layout = mc.options.hybrid
    if layout is None:
        return 0, 0
    model = fp32 = 0
    for kind in layout.states:
        n = 1
        for d in kind.shape:
            n *= int(d)
        if kind.dtype == "float32":
            fp32 += n
        else:
            model += n
    layers = len(layout.state_layers)
    return model * layers, fp32 * layers
