"""The per-layer shape of Gemma 4's text decoder, as its config.json gives it
(``FamilyOptions.gemma4``; ``splitserve.engine.models.gemma4`` runs it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerRope:
    """One layer type's RoPE as transformers' ``Gemma4TextRotaryEmbedding``
    computes it: the inverse frequencies of base ``theta`` over ``head_dim``
    (``arange(0, head_dim, 2) / head_dim``), those from pair ``angles`` on
    zeroed (``proportional``: ``int(partial_rotary_factor * head_dim // 2)``;
    ``default``: every pair turns), all divided by ``factor``."""

    theta: float
    head_dim: int
    angles: int
    factor: float = 1.0


@dataclass(frozen=True)
class Gemma4Shape:
    """Per decoder layer (each tuple has one entry a layer):

    - ``head_dims``, ``kv_heads``: its head width and KV heads (the full-attention
      layers' ``global_head_dim`` / ``num_global_key_value_heads``, or
      ``per_layer_config``'s);
    - ``k_eq_v``: no v_proj, the values are k_proj's output (``attention_k_eq_v``
      on the full-attention layers);
    - ``kv_source``: the layer whose cache it attends over: itself, or for the last
      ``num_kv_shared_layers`` layers the last earlier layer of its type, whose
      keys and values it reuses (it has no k/v projections and writes none);
    - ``intermediate``: its MLP width (doubled on the shared layers with
      ``use_double_wide_mlp``);
    - ``ropes``: its RoPE.

    ``ple_dim``: ``hidden_size_per_layer_input``, the per-layer input embeddings'
    width (0: none), ``ple_vocab`` their vocabulary. ``num_experts`` (0: none) experts of
    ``moe_intermediate``, ``top_k`` per token, beside every layer's MLP
    (``enable_moe_block``)."""

    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    k_eq_v: tuple[bool, ...]
    kv_source: tuple[int, ...]
    intermediate: tuple[int, ...]
    ropes: tuple[LayerRope, ...]
    ple_dim: int = 0
    ple_vocab: int = 0
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0

    def shares_kv(self, layer: int) -> bool:
        """Whether ``layer`` reads an earlier layer's keys and values."""
        return self.kv_source[layer] != layer

    @property
    def num_cache_layers(self) -> int:
        """Layers with a KV cache of their own: the layers before the shared ones
        (which come last and read earlier layers' caches)."""
        return max(self.kv_source) + 1
