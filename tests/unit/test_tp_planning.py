"""Tensor parallelism in planning: the planner's deployable degrees follow
the model's shape, an emitted plan sets each pool's degree and per-rank
GPUs, and the simulator times each pool at its own degree."""

from __future__ import annotations

import torch

from splitserve.cluster.config import parse_config
from splitserve.cluster.planning.planner.emit import (
    EmitContext, EnginePlan, Plan, PoolEngine, PoolPlan, config_dict)
from splitserve.cluster.planning.planner.space import engine_support, tp_splits
from splitserve.cluster.planning.shapes import ModelShape
from splitserve.cluster.planning.sim.pools import devices_for, kv_blocks
from splitserve.engine.roles import Role

SHAPE = ModelShape("m", num_layers=16, hidden_size=2048, intermediate_size=8192, num_heads=32,
                   num_kv_heads=8, head_dim=64, vocab_size=128256)


def test_deployable_degrees_are_those_the_engine_splits_the_model_by():
    assert {2, 4, 8} <= engine_support()["tensor_parallel"]
    assert all(tp_splits(SHAPE, tp) for tp in (1, 2, 4, 8, 16, 32))  # 16, 32: KV replicated
    odd = ModelShape("o", 2, 64, 96, num_heads=6, num_kv_heads=3, head_dim=16, vocab_size=512)
    # 2 and 4 neither divide 3 KV heads nor are multiples of them
    assert [tp for tp in (1, 2, 3, 4, 6) if tp_splits(odd, tp)] == [1, 3, 6]
    assert not tp_splits(ModelShape("i", 2, 64, 100, 8, 8, 8, 512), 8)  # intermediate 100


def test_gated_delta_net_hybrids_split_their_states_by_key_heads(tiny_checkpoints):
    """Qwen3-Next's shape splits at degrees dividing its 16 key heads, each
    rank reserving 1/N of the states; other hybrids stay at degree 1."""
    from splitserve.cluster.planning.kv_room import state_reserve_bytes
    from splitserve.cluster.planning.shapes import QWEN3_NEXT_80B, shape_from_config_json

    assert [tp for tp in (1, 2, 4, 8, 16, 32) if tp_splits(QWEN3_NEXT_80B, tp)] == [1, 2, 4, 8, 16]
    whole = state_reserve_bytes(QWEN3_NEXT_80B, "bfloat16", 64)
    assert state_reserve_bytes(QWEN3_NEXT_80B, "bfloat16", 64, tensor_parallel=4) == whole // 4
    assert shape_from_config_json(tiny_checkpoints["qwen3_next"]).state_heads == 2
    mamba = shape_from_config_json(tiny_checkpoints["falcon_h1"])
    assert mamba.keeps_state and mamba.state_heads == 0 and not tp_splits(mamba, 2)


def test_an_emitted_plan_sets_each_pools_degree_and_a_gpu_per_rank():
    engine = EnginePlan(block_size=16, kv_cache_dtype="auto", weight_dtype="bfloat16",
                        speculative="off")
    plan = Plan(layout="disaggregated",
                decode=PoolPlan(0, "h100", tp=2, replicas=3, engine=PoolEngine(64, 1024, 8.0)),
                prefill=PoolPlan(0, "h100", tp=4, replicas=1, engine=PoolEngine(8, 4096, 2.0)),
                engine=engine, policy="cost",
                local_prefill_max_tokens=0, autoscaling="fixed")
    ctx = EmitContext(model_name="m", model_path="/models/m", ttft_s=1.0, tpot_s=0.05,
                      trough=1.0, network_bytes_per_s=1e10, max_queue=64)
    served = parse_config(config_dict(plan, ctx)).models[0]
    assert served.engine_spec(Role.PREFILL).tensor_parallel_size == 4
    assert served.engine_spec(Role.DECODE).tensor_parallel_size == 2
    assert served.prefill.ray_actor_options(4)["num_gpus"] == 4
    assert served.decode.ray_actor_options(2)["num_gpus"] == 2
    # the simulator's devices per replica
    assert devices_for(served.prefill, True, 4) == 4
    assert devices_for(served.decode, True, 2) == 2
    assert devices_for(served.decode, False, 2) == 1  # CPU ranks share the replica's cores


def test_the_simulator_sizes_a_tp_replicas_kv_as_the_engine_does():
    from splitserve.cluster.config import ModelSpec
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.model_runner import num_kv_blocks
    from splitserve.engine.parallel.plan import ShardPlan
    from tests.unit.test_tp_plan import CFG  # 2 KV heads

    from splitserve.cluster.planning.records import EngineSettings

    shape = ModelShape("t", CFG.num_layers, CFG.hidden_size, CFG.intermediate_size, CFG.num_heads,
                       CFG.num_kv_heads, CFG.head_dim, CFG.vocab_size)
    settings = EngineSettings(dtype="float32", kv_dtype="float32")
    for tp in (1, 2, 4):
        spec = ModelSpec(kv_cache_memory_gb=0.01, block_size=16, tensor_parallel_size=tp)
        local = ShardPlan(CFG, tp, 0).local_config()
        engine = num_kv_blocks(EngineConfig(model="m", kv_cache_memory_gb=0.01, block_size=16),
                               local, torch.float32)
        assert kv_blocks(spec, shape, settings) == engine
