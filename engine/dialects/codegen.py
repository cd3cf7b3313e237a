"""CodeGen (``CodeGenForCausalLM``): GPT-J's config.json keys and decoder
(``splitserve.engine.dialects.gptj``: ``n_embd``, ``n_layer``, ``n_head``,
``n_inner``, ``rotary_dim`` 64, ``layer_norm_epsilon`` 1e-5,
``activation_function`` ``gelu_new``, untied embeddings, bos/eos 50256;
one LayerNorm feeding attention and MLP in parallel, RoPE on adjacent
pairs of each head's first ``rotary_dim`` dims with base 10000, MLP and
lm_head biases, none on the attention), as transformers' ``CodeGenConfig``
and its model read them.

What differs is the attention's one fused ``qkv_proj``, laid out over the
four model-parallel shards CodeGen was trained on (``mp_num`` = 4, fixed in
transformers): ``splitserve.engine.models.codegen`` splits it at load, which
needs ``n_embd`` a multiple of 4 as transformers' reshape does. ``n_ctx`` is
unused, as in transformers.

Refused: ``n_embd`` not a multiple of 4, what GPT-J refuses (``rotary_dim``
null, odd or wider than a head), and fp8 checkpoints (the fused qkv_proj is
split and q/k rows reordered at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, gptj
from splitserve.engine.family_config import FamilyOptions

MP_NUM = 4  # CodeGenAttention.mp_num


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = gptj.llama_keys(cfg)
    if out["hidden_size"] % MP_NUM:
        raise ValueError(f"n_embd ({out['hidden_size']}) must be a multiple of {MP_NUM} "
                         "(CodeGen's qkv_proj is laid out over 4 shards)")
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return gptj.options(cfg, "codegen", "the fused qkv_proj is split and q/k rows are reordered at load")


DIALECT = Dialect(architectures=("CodeGenForCausalLM",), llama_keys=llama_keys, options=options)
