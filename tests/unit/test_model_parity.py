"""CausalLM against transformers on tiny random checkpoints of every family.

Prefill logits must match transformers' forward in float32, greedy decoding
through the paged cache must reproduce ``generate(do_sample=False)``, and
batching (several sequences in one flat batch, chunked prefill) must not
change any sequence's logits.
"""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models import CausalLM
from splitserve.engine.models.rope import build_cos_sin_cache
from tests.fixtures.checkpoints import FAMILY_VARIANTS, hf_model

BLOCK_SIZE = 4
NUM_BLOCKS = 32
PROMPT = [0, 5, 17, 100, 200, 300, 42, 7, 9, 11, 250, 499]
ATOL = 1e-4


def new_cache(model: CausalLM, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    c = model.cfg
    return torch.zeros(c.num_cache_layers, c.kv_planes, NUM_BLOCKS, BLOCK_SIZE, c.num_kv_heads, c.head_dim,
                       dtype=dtype)


def step_meta(
    tables: list[list[int]], num_cached: list[int], num_new: list[int]
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and metadata for sequences that have ``num_cached`` tokens in
    cache and schedule ``num_new`` more; sequence b's token i lives in slot
    ``tables[b][i // BS] * BS + i % BS``."""
    positions, slots, cu = [], [], [0]
    for table, cached, new in zip(tables, num_cached, num_new):
        for pos in range(cached, cached + new):
            positions.append(pos)
            slots.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        cu.append(cu[-1] + new)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        cu_query_lens=torch.tensor(cu, dtype=torch.int32),
        context_lens=torch.tensor([c + n for c, n in zip(num_cached, num_new)], dtype=torch.int32),
        decode_only=all(n == 1 for n in num_new),
    )
    return torch.tensor(positions, dtype=torch.int64), meta


IDENTITY_TABLE = list(range(NUM_BLOCKS))


@torch.no_grad()
def run(model: CausalLM, kv: torch.Tensor, ids: list[int], positions: torch.Tensor, meta) -> torch.Tensor:
    return model.compute_logits(model(torch.tensor(ids), positions, kv, meta))


def prompt_logits(model: CausalLM, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The logits of PROMPT, prefilled into a fresh cache."""
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    return run(model, new_cache(model, dtype), PROMPT, positions, meta)


def greedy_tokens(model: CausalLM, n: int) -> list[int]:
    """PROMPT prefilled, then ``n - 1`` decode-only steps through the paged
    cache, each fed the last argmax: the ``n`` greedy tokens."""
    kv = new_cache(model)
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    generated = [int(run(model, kv, PROMPT, positions, meta)[-1].argmax())]
    for step in range(n - 1):
        positions, meta = step_meta([IDENTITY_TABLE], [len(PROMPT) + step], [1])
        assert meta.decode_only
        generated.append(int(run(model, kv, [generated[-1]], positions, meta)[-1].argmax()))
    return generated


@torch.no_grad()
def hf_logits(ref, ids: list[int]) -> torch.Tensor:
    return ref(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_prefill_logits_match_transformers(parity_models, variant):
    model, ref = parity_models(variant)
    logits = prompt_logits(model)
    assert logits.dtype == torch.float32 and logits.shape == (len(PROMPT), model.cfg.vocab_size)
    torch.testing.assert_close(logits, hf_logits(ref, PROMPT), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_greedy_decode_matches_generate(parity_models, variant):
    model, ref = parity_models(variant)
    generated = greedy_tokens(model, 8)
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=2
        )[0, len(PROMPT):].tolist()
    assert generated == expected


def test_batched_prefill_matches_each_sequence(parity_models):
    model, ref = parity_models("qwen3")
    a, b = PROMPT[:7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9]
    # b's blocks deliberately out of order and interleaved with nothing of a's
    tables = [[0, 1], [9, 4, 7, 12]]
    positions, meta = step_meta(tables, [0, 0], [len(a), len(b)])
    logits = run(model, new_cache(model), a + b, positions, meta)
    alone = []
    for ids in (a, b):
        positions, meta = step_meta([IDENTITY_TABLE], [0], [len(ids)])
        alone.append(run(model, new_cache(model), ids, positions, meta))
    torch.testing.assert_close(logits[: len(a)], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[len(a):], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[len(a):], hf_logits(ref, b), atol=ATOL, rtol=0)


def test_batched_decode_and_chunked_prefill_match_transformers(parity_models):
    model, ref = parity_models("llama3_rope")
    a, b = PROMPT, PROMPT[::-1][:9]
    tables = [[2, 0, 5, 6], [1, 3, 4]]
    kv = new_cache(model)
    # a arrives in two chunks (5 then 7 tokens), b whole, in two steps
    positions, meta = step_meta(tables[:1], [0], [5])
    run(model, kv, a[:5], positions, meta)
    positions, meta = step_meta(tables, [5, 0], [7, len(b)])
    logits = run(model, kv, a[5:] + b, positions, meta)
    torch.testing.assert_close(logits[:7], hf_logits(ref, a)[5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[7:], hf_logits(ref, b), atol=ATOL, rtol=0)
    # one decode step for both sequences together
    nxt = [int(logits[6].argmax()), int(logits[-1].argmax())]
    positions, meta = step_meta(tables, [len(a), len(b)], [1, 1])
    assert meta.decode_only
    step = run(model, kv, nxt, positions, meta)
    torch.testing.assert_close(step[0], hf_logits(ref, a + nxt[:1])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(step[1], hf_logits(ref, b + nxt[1:])[-1], atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads_the_same_weights(tiny_checkpoints, parity_models):
    single, _ = parity_models("llama")
    ck = load_checkpoint(tiny_checkpoints["llama_sharded"])
    assert len(ck.weight_files) > 1
    sharded = load_model(ck, torch.float32)
    for (name, p), (name2, q) in zip(single.named_parameters(), sharded.named_parameters()):
        assert name == name2 and torch.equal(p, q), name


@pytest.mark.parametrize(
    "dtype, atol", [(torch.bfloat16, 0.3), (torch.float16, 0.05), (torch.float32, ATOL)]
)
def test_half_precision_close_to_reference(tiny_checkpoints, dtype, atol):
    # bf16 checkpoint: the reference is its weights upcast to fp32 by transformers
    path = tiny_checkpoints["llama_bf16"]
    ck = load_checkpoint(path)
    assert ck.model_config.dtype == "bfloat16"
    model = load_model(ck, dtype)
    assert model.embed_tokens.dtype == dtype
    logits = prompt_logits(model, dtype)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hf_logits(hf_model(path), PROMPT), atol=atol, rtol=0)


def test_tied_embeddings_share_one_tensor(parity_models):
    model, _ = parity_models("llama_tied")
    assert model.lm_head is None and model.lm_head_weight is model.embed_tokens
    untied, _ = parity_models("llama")
    assert untied.lm_head is not None


# --- rotary tables --------------------------------------------------------

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "linear_old_key": {"type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    # within max_position_embeddings (the engine's longest context) dynamic NTK is the plain base
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "dynamic_odd_factor": {"type": "dynamic", "factor": 1.3},
}


def _rope_config(scaling) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "rope_theta": 50000.0, "rope_scaling": scaling,
    }


@pytest.mark.parametrize("case", ROPE_CASES)
def test_cos_sin_cache_matches_transformers(case):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = _rope_config(ROPE_CASES[case])
    cfg = ModelConfig.from_hf(raw)
    cache = build_cos_sin_cache(cfg, "cpu")
    assert cache.shape == (256, 16) and cache.dtype == torch.float32
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    rope = LlamaRotaryEmbedding(hf_cfg)
    positions = torch.arange(256)[None]
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), positions)
    half = 8
    torch.testing.assert_close(cache[:, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[:, half:], sin[0, :, :half], atol=1e-6, rtol=0)
    # rotate-half layout: both halves of transformers' table are the same
    torch.testing.assert_close(cos[0, :, half:], cos[0, :, :half])


def test_unknown_rope_type_is_rejected_with_a_clear_error():
    cfg = ModelConfig.from_hf(_rope_config({"rope_type": "no_such_scaling", "factor": 2.0}))
    with pytest.raises(CheckpointError, match="'no_such_scaling' is not supported; supported: "
                                              "default, linear, dynamic"):
        build_cos_sin_cache(cfg, "cpu")


def test_transformers_v5_rope_parameters_are_read():
    raw = _rope_config(None)
    del raw["rope_theta"], raw["rope_scaling"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope_theta == 123.0 and cfg.rope_scaling is None
    raw["rope_parameters"] = dict(ROPE_CASES["llama3"], rope_theta=5.0)
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope_theta == 5.0 and cfg.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize(
    "variant, flags",
    [
        ("llama", (False, False, False, False, None)),
        ("llama_bias", (True, True, True, False, None)),
        ("mistral", (False, False, False, False, 4096)),
        ("qwen2", (True, False, False, False, None)),
        ("qwen3", (False, False, False, True, None)),
    ],
)
def test_family_flags_parsed_from_config(tiny_checkpoints, variant, flags):
    c = load_checkpoint(tiny_checkpoints[variant]).model_config
    assert (c.attention_bias, c.o_proj_bias, c.mlp_bias, c.qk_norm, c.sliding_window) == flags
