"""GPT-J (``GPTJForCausalLM``): its config.json in the Llama-style keys.

transformers' GPTJConfig: ``n_embd``, ``n_layer``, ``n_head`` (one KV head
per query head, each n_embd / n_head wide), ``n_inner`` (None: 4 * n_embd),
``n_positions``, ``rotary_dim`` (64), ``layer_norm_epsilon`` (1e-5),
``activation_function`` (``gelu_new``), ``tie_word_embeddings`` (off),
bos/eos 50256. Its attention has no biases, its MLP and lm_head do; RoPE
has base 10000 whatever config.json says, and rotates adjacent pairs of
each head's first ``rotary_dim`` dims (splitserve.engine.models.gptj).
One LayerNorm feeds attention and MLP in parallel.

Refused: ``rotary_dim`` null (transformers then builds a table as wide as
hidden_size, which fits no head), odd or wider than a head, and fp8
checkpoints (q/k rows are reordered at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions

# config.json keys read as they are, with transformers' GPTJConfig defaults
_PASSED = {"bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": None, "dtype": None,
           "vocab_size": 50400}


def _heads(cfg: dict[str, Any]) -> tuple[int, int]:
    """(n_embd, n_head), n_embd a multiple of n_head as GPTJAttention requires."""
    hidden = int(required(cfg, "n_embd", "hidden_size"))
    heads = int(required(cfg, "n_head", "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"n_embd ({hidden}) must be a multiple of n_head ({heads})")
    return hidden, heads


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = _heads(cfg)
    return {
        **passed_keys(cfg, _PASSED),
        "hidden_size": hidden,
        "intermediate_size": int(cfg.get("n_inner") or 4 * hidden),
        "num_hidden_layers": int(required(cfg, "n_layer", "num_hidden_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": int(cfg.get("n_positions") or cfg.get("max_position_embeddings")
                                       or 2048),
        "rms_norm_eps": float(cfg.get("layer_norm_epsilon") or 1e-5),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "rope_theta": 10000.0,  # create_sinusoidal_positions' fixed base
        "attention_bias": False,
        "attention_out_bias": False,
        "mlp_bias": True,
    }


def options(cfg: dict[str, Any], family: str = "gptj",
            fp8_why: str = "q/k rows are reordered at load") -> FamilyOptions:
    """GPT-J's options; ``family`` and ``fp8_why`` name the family (CodeGen
    reads the same keys) in refusals."""
    refuse_fp8_checkpoint(cfg, family, fp8_why)
    hidden, heads = _heads(cfg)
    head_dim = hidden // heads
    rot = cfg.get("rotary_dim", 64)
    if rot is None or not 0 < int(rot) <= head_dim or int(rot) % 2:
        raise ValueError(f"rotary_dim {rot!r} is not supported for {family}: an even number of dims "
                         f"in (0, head_dim = {head_dim}] is needed")
    return FamilyOptions(hidden_act=plain_activation(cfg, family, "gelu_new"), layer_norm=True,
                         plain_mlp=("fc_in", "fc_out"), parallel_residual=True,
                         interleaved_rope=True, lm_head_bias=True,
                         rotary_dim=None if int(rot) == head_dim else int(rot))


DIALECT = Dialect(architectures=("GPTJForCausalLM",), llama_keys=llama_keys, options=options)
