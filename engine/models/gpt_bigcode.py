"""GPT-BigCode (StarCoder 1, SantaCoder): GPT-2's decoder and checkpoint
names (``splitserve.engine.models.gpt2``) with nn.Linear weights, stored
[out, in] and so not transposed, and multi-query attention.

Its fused ``attn.c_attn`` is split at load as transformers'
``GPTBigCodeAttention`` reads it: with ``multi_query`` every query head,
then the one key head and the one value head ([q (n_embd) | k | v]);
without it q, k and v per head ([h0: q | k | v, h1: ...], a view as
[heads, 3 * head_dim]). Both are Falcon's ``query_key_value`` layout, one
group per KV head holding its query heads then its key and value, which
``FalconCausalLM.split_qkv`` splits. LoRA adapters' c_attn lora_B rows
split the same way (``splitserve.engine.lora.mapped_layout``).
"""

from __future__ import annotations

from splitserve.engine.models.falcon import FalconCausalLM
from splitserve.engine.models.gpt2 import GPT2CausalLM


class GPTBigCodeCausalLM(GPT2CausalLM):
    """GPT-BigCode (``GPTBigCodeForCausalLM``): GPT-2's names, c_attn split by KV head."""

    conv1d_weights = ()
    split_qkv = FalconCausalLM.split_qkv
