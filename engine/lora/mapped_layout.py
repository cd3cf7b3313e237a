"""Where a PEFT adapter's tensors land in the families whose checkpoints
keep GPT-2's ``transformer.`` names (``MAPPED_LORA``).

PEFT names each projection by transformers' module path,
``transformer.h.<i>.<place>.<module>`` (MPT: ``transformer.blocks.<i>``);
``mapped_target`` maps it onto the engine's layer and one of
``splitserve.engine.lora.layout``'s places (``self_attn``, ``plain_mlp``),
as the family's loader renames its weights:

- GPT-2, GPT-BigCode: ``attn.c_attn`` (fused q/k/v), ``attn.c_proj`` (o),
  ``mlp.c_fc`` / ``mlp.c_proj``. GPT-2's Conv1D weights are stored
  [in, out], but PEFT's lora_A / lora_B on them are [r, in] / [out, r] as
  on nn.Linear (its ``fan_in_fan_out`` only transposes a merged delta).
- Falcon, Bloom: ``self_attention.query_key_value`` (fused),
  ``self_attention.dense`` (o), ``mlp.dense_h_to_4h`` / ``mlp.dense_4h_to_h``.
- MPT: ``attn.Wqkv`` (fused), ``attn.out_proj`` (o), ``ffn.up_proj`` /
  ``ffn.down_proj``.
- GPT-J: ``attn.q_proj`` / ``k_proj`` / ``v_proj``, ``attn.out_proj`` (o),
  ``mlp.fc_in`` / ``mlp.fc_out``; CodeGen the same with one fused
  ``attn.qkv_proj``. Their q/k lora_B rows are reordered as the weights'
  (``GPTJCausalLM.adapter_rows``).

A fused projection's LoRA is served as q, k and v parts sharing its A,
each part taking the rows of lora_B that the loader takes of the weight
(``mapped_parts``), so the engine's delta is PEFT's.
"""

from __future__ import annotations

from splitserve.engine.config import ModelConfig
from splitserve.engine.dialects.codegen import MP_NUM

_QKV = ("q_proj", "k_proj", "v_proj")
# family -> (PEFT's layer container, PEFT's "place.module" -> (engine place, engine module))
_GPT2 = ("transformer.h", {"attn.c_attn": ("self_attn", "c_attn"), "attn.c_proj": ("self_attn", "o_proj"),
                           "mlp.c_fc": ("plain_mlp", "c_fc"), "mlp.c_proj": ("plain_mlp", "c_proj")})
_FALCON = ("transformer.h", {"self_attention.query_key_value": ("self_attn", "query_key_value"),
                             "self_attention.dense": ("self_attn", "o_proj"),
                             "mlp.dense_h_to_4h": ("plain_mlp", "dense_h_to_4h"),
                             "mlp.dense_4h_to_h": ("plain_mlp", "dense_4h_to_h")})
_GPTJ_MLP = {"attn.out_proj": ("self_attn", "o_proj"), "mlp.fc_in": ("plain_mlp", "fc_in"),
             "mlp.fc_out": ("plain_mlp", "fc_out")}
MAPPED_LORA: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,
    "falcon": _FALCON,
    "bloom": _FALCON,
    "mpt": ("transformer.blocks", {"attn.Wqkv": ("self_attn", "Wqkv"), "attn.out_proj": ("self_attn", "o_proj"),
                                   "ffn.up_proj": ("plain_mlp", "up_proj"),
                                   "ffn.down_proj": ("plain_mlp", "down_proj")}),
    "gptj": ("transformer.h", {**{f"attn.{p}": ("self_attn", p) for p in _QKV}, **_GPTJ_MLP}),
    "codegen": ("transformer.h", {"attn.qkv_proj": ("self_attn", "qkv_proj"), **_GPTJ_MLP}),
}
# the fused q/k/v projections' engine names: [in, q + 2 * kv] like the weights they split
FUSED_QKV_NAMES = ("c_attn", "query_key_value", "Wqkv", "qkv_proj")


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

    - GPT-2's ``c_attn``, MPT's ``Wqkv``: [q | k | v];
    - Falcon's and Bloom's ``query_key_value``, GPT-BigCode's ``c_attn``:
      per KV head its query heads, its key, its value
      (``FalconCausalLM.split_qkv``);
    - CodeGen's ``qkv_proj``: ``MP_NUM`` shards of [q | v | k]
      (``CodeGenCausalLM.mapped``)."""
    if module not in FUSED_QKV_NAMES:
        return ((module, 0, 0, 0),)  # 0 rows: the whole of lora_B
    d, heads, kv = model.head_dim, model.num_heads, model.num_kv_heads
    if model.family in ("gpt2", "mpt"):
        q = heads * d
        return ("q_proj", 0, q, 0), ("k_proj", q, kv * d, 0), ("v_proj", q + kv * d, kv * d, 0)
    if model.family == "codegen":
        shard = model.hidden_size // MP_NUM
        return tuple((name, i * shard, shard, 3 * shard) for i, name in enumerate(("q_proj", "v_proj", "k_proj")))
    group = heads // kv * d  # one KV head's query rows
    period = group + 2 * d
    return ("q_proj", 0, group, period), ("k_proj", group, d, period), ("v_proj", group + d, d, period)
