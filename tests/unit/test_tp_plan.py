"""What each tensor-parallel rank holds (pure arithmetic, no processes):
head, KV-head and vocabulary ranges, the shard's config, refusals naming
the number that does not divide, and the checkpoint slices a rank loads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.engine.config import ModelConfig, MoEConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models import build_model
from splitserve.engine.parallel.plan import ShardPlan, TensorParallelConfigError, check
from splitserve.engine.parallel.sharding import RankSlice, ZeroOnThisRank, shard_slots

CFG = ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=10, hidden_size=16,
                  intermediate_size=24, num_layers=1, num_heads=8, num_kv_heads=2, head_dim=2,
                  rms_norm_eps=1e-6, rope_theta=1e4, max_position=64, tie_word_embeddings=False,
                  attention_bias=True, qk_norm=False, o_proj_bias=True)


def test_ranges_split_heads_and_replicate_kv_heads_beyond_their_count():
    assert [ShardPlan(CFG, 2, r).kv_heads() for r in range(2)] == [(0, 1), (1, 2)]
    four = [ShardPlan(CFG, 4, r) for r in range(4)]
    assert [p.q_heads() for p in four] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [p.kv_heads() for p in four] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # 4 q heads per KV head
    assert [four[0].kv_head_owner(h) for h in range(2)] == [0, 2]
    # vocabulary 10 over 4 ranks: shards of 3, the last one padded
    assert [p.vocab() for p in four] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    local = four[1].local_config()
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) \
        == (2, 1, 6, 3)


def test_a_model_that_does_not_split_is_refused_with_the_numbers():
    check(CFG, 1)
    with pytest.raises(TensorParallelConfigError, match=r"num_attention_heads \(8\) is not a multiple"):
        check(CFG, 3)
    with pytest.raises(TensorParallelConfigError, match=r"intermediate_size \(20\)"):
        check(dataclasses.replace(CFG, intermediate_size=20), 8)
    with pytest.raises(TensorParallelConfigError, match=r"num_key_value_heads \(3\)"):
        check(dataclasses.replace(CFG, num_heads=12, num_kv_heads=3, intermediate_size=48), 4)
    moe = MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=6, renormalize=True,
                    sparse_layers=(True,))
    with pytest.raises(TensorParallelConfigError, match=r"experts' intermediate size \(6\)"):
        check(dataclasses.replace(CFG, family="mixtral", moe=moe), 4)


def test_each_rank_loads_its_rows_columns_and_bias_once():
    plan = ShardPlan(CFG, 2, 1)
    model = build_model(plan.local_config(), torch.float32, "cpu")
    slots = shard_slots(model.weight_slots(), plan)
    p = "model.layers.0"
    q = slots[f"{p}.self_attn.q_proj.weight"]
    assert isinstance(q, RankSlice) and (q.dim, q.start, q.size) == (0, 8, 8)  # heads 4..7 x D 2
    k = slots[f"{p}.self_attn.k_proj.bias"]
    assert (k.dim, k.start, k.size) == (0, 2, 2)  # KV head 1
    o = slots[f"{p}.self_attn.o_proj.weight"]
    assert (o.dim, o.start, o.size) == (1, 8, 8)
    assert isinstance(slots[f"{p}.self_attn.o_proj.bias"], ZeroOnThisRank)
    down = slots[f"{p}.mlp.down_proj.weight"]
    assert (down.dim, down.start, down.size) == (1, 12, 12)
    emb = slots["model.embed_tokens.weight"]
    assert (emb.dim, emb.start, emb.size) == (0, 5, 5)
    full = torch.arange(10 * 16, dtype=torch.float32).reshape(10, 16)
    emb.load("model.embed_tokens.weight", full)
    assert torch.equal(model.embed_tokens.data, full[5:])
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.down_proj.weight"):
        down.load(f"{p}.mlp.down_proj.weight", torch.zeros(16, 20))  # 20 columns, not 24


def test_adapters_split_by_rows_and_columns_and_refuse_what_does_not(tiny_checkpoints):
    from splitserve.engine.loader import load_checkpoint
    from splitserve.engine.lora.adapter import AdapterError
    from splitserve.engine.parallel.lora_shards import shard_adapter

    cfg = load_checkpoint(tiny_checkpoints["qwen3"]).model_config  # 4 query heads, 2 KV heads
    hd, h = cfg.head_dim, cfg.hidden_size
    a_in, a_q = torch.randn(3, h), torch.randn(3, cfg.num_heads * hd)
    mods = {(0, "q_proj"): (a_in, torch.randn(cfg.num_heads * hd, 3)),
            (0, "k_proj"): (a_in, torch.randn(cfg.num_kv_heads * hd, 3)),
            (0, "o_proj"): (a_q, torch.randn(h, 3)),
            (1, "down_proj"): (torch.randn(3, cfg.intermediate_size), torch.randn(h, 3))}
    for r in range(2):
        part = shard_adapter(mods, ShardPlan(cfg, 2, r))
        q_rows = cfg.num_heads * hd // 2
        assert part[(0, "q_proj")][0] is a_in
        assert torch.equal(part[(0, "q_proj")][1], mods[(0, "q_proj")][1][r * q_rows:(r + 1) * q_rows])
        assert torch.equal(part[(0, "k_proj")][1], mods[(0, "k_proj")][1][r * hd:(r + 1) * hd])
        assert torch.equal(part[(0, "o_proj")][0], a_q[:, r * q_rows:(r + 1) * q_rows])
        assert part[(1, "down_proj")][1] is mods[(1, "down_proj")][1]
    # 4 ranks over 2 KV heads: each head's rows on two ranks
    assert torch.equal(shard_adapter(mods, ShardPlan(cfg, 4, 3))[(0, "k_proj")][1],
                       mods[(0, "k_proj")][1][hd:2 * hd])
    with pytest.raises(AdapterError, match="in_proj_qkv is not split"):  # no Gated DeltaNet here
        shard_adapter({(0, "in_proj_qkv"): (a_in, a_in.T)}, ShardPlan(cfg, 2, 0))
    # Qwen3.5's Gated DeltaNet: in_proj_qkv's rows in the rank's q, k and v channel runs
    hybrid = load_checkpoint(tiny_checkpoints["qwen3_5"]).model_config
    plan = ShardPlan(hybrid, 2, 1)
    g = hybrid.options.gated_delta_net
    b = torch.arange(float(2 * g.key_dim + g.value_dim))[:, None]
    part = shard_adapter({(0, "in_proj_qkv"): (a_in, b)}, plan)[(0, "in_proj_qkv")][1]
    assert part[:, 0].tolist() == [i for s, k in plan.gdn_channels() for i in range(s, s + k)]
