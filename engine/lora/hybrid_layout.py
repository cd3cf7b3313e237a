"""Where a PEFT adapter's tensors land in the Mamba-2 hybrids (``MAMBA2_LORA``).

PEFT names each projection by transformers' module path; these families
name theirs differently from Llama, and some group them differently from
the engine's decoder layers. ``mamba2_target`` maps a path
``<root>.layers.<i>.<place>.<module>`` onto the engine's layer and one of
``splitserve.engine.lora.layout``'s places (``self_attn``, ``mlp``,
``mamba``; ``shared_mlp``, ``plain_mlp``, ``zamba2_block`` for the
projections below that only one family has), or says why it is refused:

- Bamba, Falcon-H1: ``self_attn.{q,k,v,o}_proj``, ``mamba.{in,out}_proj``
  and the SwiGLU MLP as ``feed_forward.{gate,up,down}_proj``. Falcon-H1's
  multipliers apply to each projection's output with its delta, as in
  transformers.
- Granite 4.0-H: ``self_attn``, ``mamba`` and the dense ``shared_mlp``
  (in every layer, beside the experts where there are experts) as its fused
  ``input_linear`` (gate rows then up rows: one LoRA served as a gate part
  and an up part sharing A) and ``output_linear``.
- Nemotron-H: every checkpoint block is ``model.layers.<j>.mixer`` (or
  ``backbone.layers.<j>.mixer``, the name before transformers 5); the
  engine folds a mixer block and the MLP block after it into one layer
  (``FamilyOptions.checkpoint_blocks``). Attention blocks' q/k/v/o and
  Mamba-2 blocks' ``in_proj`` and its ungated relu2 MLP blocks' ``up_proj``
  and ``down_proj`` take LoRA; MoE blocks take none.
- Zamba2: the Mamba-2 mixers, ``mamba.{in,out}_proj`` of a Mamba-2 layer
  and ``mamba_decoder.mamba.{in,out}_proj`` of a hybrid layer; a hybrid
  layer's ``linear`` and its use of a shared block,
  ``shared_transformer.self_attn.{q,k,v,o}_proj`` and
  ``shared_transformer.feed_forward.{gate_up,down}_proj``: transformers
  gives every use of a shared block its own module (only the weights are
  tied), so PEFT trains a LoRA per use, and the engine keeps one per hybrid
  layer (``splitserve.engine.models.zamba2``). The model's own per-use
  adapters (``*_adapter_list``) take none.

PEFT refuses LoRA on ``out_proj`` of the models it lists as Mamba-based
(Falcon-H1 and Nemotron-H among them: transformers' fused kernels read that
weight directly), so such a tensor is refused here too.
"""

from __future__ import annotations

from splitserve.engine.config import ModelConfig
from splitserve.engine.hybrid_config import ATTENTION

# families whose Mamba-2 mixers take LoRA on in_proj (and out_proj where PEFT allows it)
MAMBA2_LORA = ("bamba", "granitemoehybrid", "falcon_h1", "nemotron_h", "zamba2")
MAMBA_PROJECTIONS = ("in_proj", "out_proj")
_NO_OUT_PROJ = ("falcon_h1", "nemotron_h")  # PEFT's Mamba-based model types among these
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
_PLAIN_MLP = ("up_proj", "down_proj")  # Nemotron-H's ungated MLP blocks
# Zamba2's shared block: PEFT's place -> its projections
_ZAMBA2_BLOCK = {"shared_transformer.self_attn": _ATTENTION,
                 "shared_transformer.feed_forward": ("gate_up_proj", "down_proj")}
# Granite 4.0-H's fused shared_mlp projections -> the engine MLP's parts, in row order
FUSED_MLP = {"input_linear": ("gate_proj", "up_proj"), "output_linear": ("down_proj",)}


def mamba2_target(model: ModelConfig, root: str, layer: int, place: str,
                  module: str) -> tuple[int, str] | str | None:
    """(engine layer, place) of PEFT's module ``<root>.layers.<layer>.<place>.<module>``
    in a ``MAMBA2_LORA`` family; a str: why it is refused; None: a name no
    family serves (``layout._refusal`` says why)."""
    family = model.family
    if root != "model" and family != "nemotron_h":
        return None
    if place in ("mamba", "mixer") and module == "out_proj" and family in _NO_OUT_PROJ:
        return f"PEFT applies no LoRA to {model.architecture}'s Mamba-2 out_proj (transformers' " \
               "fused kernels read its weight directly); in_proj takes LoRA"
    if family == "nemotron_h":
        return _nemotron_h(model, layer, place, module)
    if family == "zamba2":
        return _zamba2(model, layer, place, module)
    if place == "mamba" and module in MAMBA_PROJECTIONS or place == "self_attn" and module in _ATTENTION:
        return layer, place
    if family == "granitemoehybrid":
        return (layer, "shared_mlp") if place == "shared_mlp" and module in FUSED_MLP else None
    return (layer, "mlp") if place == "feed_forward" and module in _GATED_MLP else None


def _nemotron_h(model: ModelConfig, block: int, place: str, module: str) -> tuple[int, str] | str | None:
    """Nemotron-H's checkpoint block ``block``: its engine layer, or why not."""
    if place != "mixer" and not place.startswith("mixer."):
        return None
    blocks = model.options.checkpoint_blocks
    for layer, (mixer, mlp) in enumerate(blocks):
        if block == mixer:
            attends = model.options.hybrid.layer_kinds[layer] == ATTENTION
            names, kind = (_ATTENTION, "an attention") if attends else (MAMBA_PROJECTIONS, "a Mamba-2")
            if place == "mixer" and module in names:
                return layer, "self_attn" if attends else "mamba"
            return f"block {block} is {kind} block, whose LoRA targets are {', '.join(names)}"
        if block == mlp:
            if model.moe is not None and model.moe.sparse_layers[layer]:
                return f"block {block} is a mixture-of-experts block; MoE experts, routers, shared " \
                       "experts and latent projections take no LoRA"
            if place == "mixer" and module in _PLAIN_MLP:
                return layer, "plain_mlp"
            return f"block {block} is an MLP block, whose LoRA targets are {', '.join(_PLAIN_MLP)}"
    count = 1 + max(max(pair) for pair in blocks)
    return f"it is for block {block}; the model has {count} blocks"


def _zamba2(model: ModelConfig, layer: int, place: str, module: str) -> tuple[int, str] | str | None:
    """Zamba2's layer ``layer``: where ``place.module`` lands, or why not."""
    if layer >= model.num_layers:
        return f"it is for layer {layer}; the model has {model.num_layers} layers"
    if "_adapter_list." in place:
        return "Zamba2's own per-use adapters (linear_q/k/v_adapter_list, gate_up_proj_adapter_list) " \
               "take no LoRA; the shared block's projections they add to do"
    hybrid = layer in model.options.hybrid.attention_layers
    if place in ("mamba", "mamba_decoder.mamba") and module in MAMBA_PROJECTIONS:
        mixer = "mamba_decoder.mamba" if hybrid else "mamba"
        return (layer, "mamba") if place == mixer else \
            f"layer {layer} is a {'hybrid' if hybrid else 'Mamba-2'} layer, whose mixer is {mixer}"
    if place == "" and module == "linear" or module in _ZAMBA2_BLOCK.get(place, ()):
        return (layer, "zamba2_block") if hybrid else \
            f"layer {layer} is a Mamba-2 layer, without a shared block or linear"
    return None


def zamba2_block_shape(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(in, out) of a Zamba2 hybrid layer's ``linear`` or a projection of its shared block."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (2 * h, q), "k_proj": (2 * h, kv), "v_proj": (2 * h, kv), "o_proj": (q, h),
            "gate_up_proj": (h, 2 * i), "down_proj": (i, h), "linear": (h, h)}[module]


def engine_parts(model: ModelConfig, place: str, module: str) -> tuple[tuple[str, int, int], ...]:
    """The engine targets of one PEFT projection: (name, first row of its
    lora_B, rows); one, the projection itself, except Granite 4.0-H's fused
    ``input_linear`` (its gate and up parts)."""
    if place != "shared_mlp":
        return ((module, 0, 0),)  # 0 rows: the whole of lora_B
    rows = model.intermediate_size if module == "input_linear" else 0
    return tuple((name, i * rows, rows) for i, name in enumerate(FUSED_MLP[module]))
