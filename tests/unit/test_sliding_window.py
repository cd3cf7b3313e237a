"""Sliding-window attention: the reference ops against a dense computation,
the window parsed from each family's config as transformers applies it, and
greedy parity with transformers past the window for Mistral and for Qwen2
with windowed and full layers mixed."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.kernels import reference as ref
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.unit.test_engine_parity import prompt_set

D = 8


def _paged(context_lens, bs=4, hk=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    per = [math.ceil(c / bs) for c in context_lens]
    nb = sum(per) + 2
    perm = torch.randperm(nb, generator=g)
    tables = torch.zeros(len(per), max(per), dtype=torch.int32)
    start = 0
    for b, n in enumerate(per):
        tables[b, :n] = perm[start:start + n].int()
        start += n
    k = torch.randn(nb, bs, hk, D, generator=g)
    v = torch.randn(nb, bs, hk, D, generator=g)
    return k, v, tables


def _dense(q, k, v, table, ctx, q_pos, window, bs):
    """Each query row by itself: softmax over the keys in (pos - window, pos]."""
    hq, hk = q.shape[1], k.shape[2]
    keys = k[table[: math.ceil(ctx / bs)].long()].reshape(-1, hk, D)[:ctx]
    vals = v[table[: math.ceil(ctx / bs)].long()].reshape(-1, hk, D)[:ctx]
    out = torch.empty_like(q)
    for i, p in enumerate(q_pos):
        lo = max(0, p - window + 1) if window else 0
        for h in range(hq):
            kk, vv = keys[lo:p + 1, h // (hq // hk)], vals[lo:p + 1, h // (hq // hk)]
            w = torch.softmax(kk @ q[i, h] * D**-0.5, dim=0)
            out[i, h] = w @ vv
    return out


@pytest.mark.parametrize("window", [0, 1, 3, 6, 50])
def test_reference_decode_and_prefill_match_dense(window):
    ctxs, bs = [1, 5, 13, 20], 4
    k, v, tables = _paged(ctxs, bs)
    q = torch.randn(len(ctxs), 4, D, generator=torch.Generator().manual_seed(1))
    out = ref.paged_decode_attention(q, k, v, tables, torch.tensor(ctxs), D**-0.5,
                                     sliding_window=window)
    for b, c in enumerate(ctxs):
        want = _dense(q[b:b + 1], k, v, tables[b], c, [c - 1], window, bs)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-5, atol=1e-5)
    # prefill: a whole prompt, a chunk after a cached prefix, and single tokens
    q_lens = [1, 5, 7, 1]
    qp = torch.randn(sum(q_lens), 4, D, generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    out = ref.paged_attention(qp, k, v, tables, cu, torch.tensor(ctxs), D**-0.5,
                              sliding_window=window)
    for b, c in enumerate(ctxs):
        s, e = int(cu[b]), int(cu[b + 1])
        want = _dense(qp[s:e], k, v, tables[b], c, list(range(c - (e - s), c)), window, bs)
        torch.testing.assert_close(out[s:e], want, rtol=1e-5, atol=1e-5)


BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "vocab_size": 512}


@pytest.mark.parametrize("arch, extra, windows", [
    ("MistralForCausalLM", {"sliding_window": 8}, (8, 8, 8, 8)),
    ("MistralForCausalLM", {"sliding_window": None}, (0, 0, 0, 0)),
    ("Qwen2ForCausalLM", {"sliding_window": 8}, (0, 0, 0, 0)),  # use_sliding_window off
    ("Qwen2ForCausalLM", {"sliding_window": 8, "use_sliding_window": True,
                          "max_window_layers": 2}, (0, 0, 8, 8)),
    ("Qwen3ForCausalLM", {"sliding_window": 8, "use_sliding_window": True,
                          "layer_types": ["sliding_attention", "full_attention"] * 2}, (8, 0, 8, 0)),
    ("LlamaForCausalLM", {"sliding_window": 8, "use_sliding_window": True}, (0, 0, 0, 0)),
])
def test_layer_windows_parsed_as_transformers_applies_them(arch, extra, windows):
    cfg = ModelConfig.from_hf({"architectures": [arch], **BASE, **extra})
    assert cfg.layer_windows == windows
    assert cfg.sliding_window == (max(windows) or None)


def test_bad_window_config_is_a_clear_error():
    from splitserve.engine.errors import CheckpointError

    with pytest.raises(CheckpointError, match="layer_types has 1 entries for 4 layers"):
        ModelConfig.from_hf({"architectures": ["Qwen2ForCausalLM"], **BASE, "sliding_window": 8,
                             "use_sliding_window": True, "layer_types": ["full_attention"]})
    with pytest.raises(CheckpointError, match="sliding_window must be positive"):
        ModelConfig.from_hf({"architectures": ["MistralForCausalLM"], **BASE, "sliding_window": -4})


MAX_NEW = 12


@pytest.mark.parametrize("variant", ["mistral_window", "qwen2_window"])
def test_greedy_parity_past_the_window(tiny_checkpoints, variant):
    """Prompts of 1-60 tokens against a window of 8, generating 12 more:
    one at a time, batched, and in prefill chunks of 5 tokens."""
    path = tiny_checkpoints[variant]
    ref_model = hf_model(path)
    assert ref_model.config.sliding_window == 8
    prompts = prompt_set(ref_model.config.vocab_size, seed=3)
    want = hf_greedy(ref_model, prompts, MAX_NEW)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    for kw in ({}, {"max_num_batched_tokens": 5}):
        eng = LLMEngine(EngineConfig(model=str(path), num_blocks=256, block_size=4,
                                     max_num_batched_tokens=kw.get("max_num_batched_tokens", 512)))
        assert eng.max_model_len == ref_model.config.max_position_embeddings  # not capped at the window
        assert [r.token_ids for r in eng.generate(prompts, greedy)] == want, kw
        if not kw:
            assert [eng.generate([p], greedy)[0].token_ids for p in prompts] == want
        assert eng.kv.all_free()
