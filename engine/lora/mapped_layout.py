"""Where a PEFT adapter's tensors land in the families whose checkpoints
keep GPT-2's ``transformer.`` names (``MAPPED_LORA``).

PEFT names each projection by transformers' module path,
``transformer.h.<i>.<place>.<module>``;
``mapped_target`` maps it onto the engine's layer and one of
``splitserve.engine.lora.layout``'s places (``self_attn``, ``plain_mlp``),
as the family's loader renames its weights:

- GPT-2, GPT-BigCode: ``attn.c_attn`` (fused q/k/v), ``attn.c_proj`` (o),
  ``mlp.c_fc`` / ``mlp.c_proj``. GPT-2's Conv1D weights are stored
  [in, out], but PEFT's lora_A / lora_B on them are [r, in] / [out, r] as
  on nn.Linear (its ``fan_in_fan_out`` only transposes a merged delta).

A fused projection's LoRA is served as q, k and v parts sharing its A,
each part taking the rows of lora_B that the loader takes of the weight
(``mapped_parts``), so the engine's delta is PEFT's.
"""

from __future__ import annotations

from splitserve.engine.config import ModelConfig

# family -> (PEFT's layer container, PEFT's "place.module" -> (engine place, engine module))
_GPT2 = ("transformer.h", {"attn.c_attn": ("self_attn", "c_attn"), "attn.c_proj": ("self_attn", "o_proj"),
                           "mlp.c_fc": ("plain_mlp", "c_fc"), "mlp.c_proj": ("plain_mlp", "c_proj")})
MAPPED_LORA: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,
}
# the fused q/k/v projections' engine names: [in, q + 2 * kv] like the weights they split
FUSED_QKV_NAMES = ("c_attn", "query_key_value", "qkv_proj")


def mapped_target(model: ModelConfig, root: str, layer: int, place: str,
                  module: str) -> tuple[int, str, str] | str | None:
    """(engine layer, place, projection) of PEFT's module
    ``<root>.<layer>.<place>.<module>`` in a ``MAPPED_LORA`` family; a str:
    why it is refused; None: a name no family serves."""
    if model.family not in MAPPED_LORA:
        return None
    container, names = MAPPED_LORA[model.family]
    target = names.get(f"{place}.{module}")
    if root != container or target is None:
        return (f"{model.architecture}'s LoRA targets are "
                f"{', '.join(f'{container}.<i>.{n}' for n in names)}")
    return (layer,) + target


def mapped_parts(model: ModelConfig, module: str) -> tuple[tuple[str, int, int, int], ...]:
    """The engine targets of one projection (``mapped_target``'s): (name,
    first row, rows, period) of its lora_B (``layout.ModuleLora``), a fused
    q/k/v split as ``splitserve.engine.models``' loader splits the weight:

    - GPT-2's ``c_attn``: [q | k | v];
    - GPT-BigCode's ``c_attn``: per KV head its query heads, its key, its
      value (``FalconCausalLM.split_qkv``)."""
    if module not in FUSED_QKV_NAMES:
        return ((module, 0, 0, 0),)  # 0 rows: the whole of lora_B
    d, heads, kv = model.head_dim, model.num_heads, model.num_kv_heads
    if model.family == "gpt2":
        q = heads * d
        return ("q_proj", 0, q, 0), ("k_proj", q, kv * d, 0), ("v_proj", q + kv * d, kv * d, 0)
    group = heads // kv * d  # one KV head's query rows
    period = group + 2 * d
    return ("q_proj", 0, group, period), ("k_proj", group, d, period), ("v_proj", group + d, d, period)
