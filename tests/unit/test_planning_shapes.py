"""The planner's model shapes: parameter counts from the engine's own model
(built on the meta device) against the tensors of tiny checkpoints, the
recurrent state a hybrid keeps per sequence, and the KV blocks the planner
and the simulator give a replica against the engine's own sizing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors import safe_open

from splitserve.cluster.config import ModelSpec
from splitserve.cluster.planning import kv_room
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.shapes import PRESETS, shape_from_config_json
from splitserve.cluster.planning.sim.pools import kv_blocks
from splitserve.cluster.planning.sim.options import engine_settings
from splitserve.engine.config import EngineConfig
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.model_runner import kv_cache_dtype, num_kv_blocks, resolve_dtype

QWEN3_NEXT = PRESETS["qwen3-next-80b-a3b"]


def _tensors(path) -> dict[str, int]:
    """Each tensor of a checkpoint folder and its element count."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                out[k] = int(np.prod(sf.get_slice(k).get_shape()))
    return out


# variant -> (experts, experts per token), under each family's own config keys:
# Mixtral num_local_experts, Qwen num_experts, DeepSeek n_routed_experts, Gemma 4
# top_k_experts, Jamba num_experts
@pytest.mark.parametrize("variant, experts", [
    ("llama", (0, 0)), ("llama_tied", (0, 0)), ("mixtral", (4, 2)), ("qwen3_moe", (4, 2)),
    ("deepseek_v3", (8, 2)), ("qwen3_next", (4, 2)), ("jamba", (4, 2)), ("gemma4_moe", (4, 2)),
    ("mamba", (0, 0))])
def test_parameter_counts_are_the_checkpoints_tensors(tiny_checkpoints, variant, experts):
    """Dense, tied, MoE, MLA + shared experts + a dense first layer, Gated DeltaNet and
    Mamba hybrids with experts, Gemma 4's experts beside its MLP, pure Mamba: the
    engine's model holds what the checkpoint stores, its routed experts (named
    .experts.) included; active = the rest + top_k / E of them, less the input table."""
    path = tiny_checkpoints[variant]
    tensors = _tensors(path)
    shape = shape_from_config_json(path)
    routed = sum(n for k, n in tensors.items() if ".experts." in k)
    lookup = 0 if shape.tie_word_embeddings else tensors["model.embed_tokens.weight"] \
        if "model.embed_tokens.weight" in tensors else tensors["backbone.embeddings.weight"]
    assert (shape.num_experts, shape.experts_per_token) == experts
    assert shape.num_params == shape.params_total == sum(tensors.values())
    e, k = experts
    assert shape.active_params_per_token == (
        sum(tensors.values()) - routed + (routed * k // e if e else 0) - lookup)
    assert (routed > 0) == bool(e)  # the experts are there to leave out
    assert shape.params_routed == shape.routed_params == routed


@pytest.mark.parametrize("variant", ["llama", "deepseek_v3", "qwen3_next", "jamba", "mamba"])
def test_kv_blocks_are_the_engines_for_the_same_settings(tiny_checkpoints, variant, tmp_path):
    """The simulator's (and kv_room's, which the planner's units use) blocks for a
    memory budget are what LLMEngine sizes with the same settings: a hybrid's states
    for 2 x max_num_seqs sequences and its state checkpoints first, a model without
    attention by context; the KV bytes per token are ModelConfig's (MLA's latent
    stored once included), and the shape keeps them through the database."""
    path = tiny_checkpoints[variant]
    shape = shape_from_config_json(path)
    mc = load_checkpoint(path).model_config
    hybrid = mc.options.hybrid
    assert shape.state_bytes_per_sequence("float32") == (
        hybrid.state_bytes_per_sequence(4) if hybrid else 0)
    assert shape.kv_bytes_per_token("float32") == mc.kv_bytes_per_token(torch.float32)
    assert (shape.kv_planes == 1) == (variant == "deepseek_v3")
    db = ProfileDB(tmp_path / "p.db")
    db.put_model(shape)
    assert db.model(shape.key) == shape
    for gb, seqs in ((0.01, 8), (0.002, 4), (0.05, 64)):
        cfg = EngineConfig(model=str(path), kv_cache_memory_gb=gb, max_num_seqs=seqs, block_size=4)
        dtype = resolve_dtype(cfg, mc, torch.device("cpu"))
        engine = num_kv_blocks(cfg, mc, kv_cache_dtype(cfg, dtype), dtype)
        spec = ModelSpec(kv_cache_memory_gb=gb, max_num_seqs=seqs, block_size=4)
        assert kv_blocks(spec, shape, engine_settings(spec, "cpu", 1)) == engine, (gb, seqs)
    if hybrid is not None:  # the states alone fill the budget: the engine refuses, so do we
        states = 3 * 8 * hybrid.state_bytes_per_sequence(4)  # live slots and state checkpoints
        cfg = EngineConfig(model=str(path), kv_cache_memory_gb=states / (1 << 30), max_num_seqs=8)
        with pytest.raises(ValueError, match="cannot hold the recurrent states"):
            num_kv_blocks(cfg, mc, torch.float32, torch.float32)
        assert kv_room.kv_blocks(shape, states, kv_dtype="float32", dtype="float32",
                                 block_size=16, max_num_seqs=8) == 0


def test_hybrid_preset_is_the_engines_count_of_the_released_shape():
    """The Qwen3-Next-80B-A3B preset's counts and states are the engine's for
    transformers' Qwen3NextConfig defaults (the released shape), built on meta."""
    import transformers

    from splitserve.cluster.planning.param_count import count_parameters, state_elements
    from splitserve.engine.config import ModelConfig

    raw = transformers.Qwen3NextConfig().to_dict()
    raw["architectures"] = ["Qwen3NextForCausalLM"]
    mc = ModelConfig.from_hf(raw, "Qwen3NextConfig()")
    count = count_parameters(mc)
    assert (QWEN3_NEXT.params_total, QWEN3_NEXT.params_active) == (count.total, count.active_per_token)
    assert QWEN3_NEXT.params_routed == count.routed
    assert (QWEN3_NEXT.num_experts, QWEN3_NEXT.experts_per_token) == (512, 10)
    assert (QWEN3_NEXT.state_elems, QWEN3_NEXT.state_elems_fp32) == state_elements(mc)
    assert QWEN3_NEXT.state_bytes_per_sequence("bfloat16") == mc.options.hybrid.state_bytes_per_sequence(2)
    assert QWEN3_NEXT.kv_bytes_per_token("bfloat16") == mc.kv_bytes_per_token(torch.bfloat16)
    assert QWEN3_NEXT.cache_layers == mc.num_cache_layers == 12
    for preset in PRESETS.values():  # every preset builds its figures
        assert preset.num_params >= preset.active_params_per_token > 0
        assert preset.kv_bytes_per_token("bfloat16") > 0


def test_planner_units_leave_the_hybrids_states_out_of_the_kv_tokens(tmp_path):
    """A replica's KV tokens in the planner's units are the blocks the engine would
    cut from the kv_cache_memory_gb it is given, after 3 x max_num_seqs states (each
    TP=2 rank's half: its key heads'): fewer with the larger batch cap, and the
    simulator sizes the written memory alike. Split replicas deploy colocated only."""
    from splitserve.cluster.bench.datasets import parse_length_dist
    from splitserve.cluster.planning.planner.inputs import SLO, Offer, synthetic_workload
    from splitserve.cluster.planning.planner.request import PlanRequest
    from splitserve.cluster.planning.planner.search import Planner
    from splitserve.cluster.planning.planner.space import SpaceSpec

    space = SpaceSpec(layouts=("colocated", "disaggregated"), max_num_seqs=(16, 128),
                      max_num_batched_tokens=(2048,),
                      block_sizes=(16,), kv_dtypes=("auto",), weight_dtypes=("bfloat16",),
                      tensor_parallel=(1, 2), speculative=("off",), policies=("round_robin",),
                      local_prefill=(0,), autoscaling=("fixed",), max_replicas=2)
    wl = synthetic_workload(2, parse_length_dist("uniform:256:1024"), parse_length_dist("64"),
                            window=60, sample=100)
    req = PlanRequest(QWEN3_NEXT, "qwen3-next", None, wl, SLO(2.0, 0.1), [Offer("h200", 2)],
                      space=space, max_ppl_increase=None)
    planner = Planner(req, ProfileDB(tmp_path / "p.db"))
    planner.analytic()
    u = planner.tables["colocated"][0]
    stateless = dataclasses.replace(QWEN3_NEXT, state_elems=0, state_elems_fp32=0)
    seen = set()
    for i in np.flatnonzero(u.mem_ok):
        tp, seqs, block = int(u.tp[i]), int(u.seqs[i]), int(u.block[i])
        spec = ModelSpec(kv_cache_memory_gb=float(u.kv_gib[i]), block_size=block,
                         max_num_seqs=seqs, tensor_parallel_size=tp)
        settings = engine_settings(spec, "cuda", tp)
        blocks = kv_blocks(spec, QWEN3_NEXT, settings)
        assert blocks * block == pytest.approx(float(u.kv_tokens[i]), rel=1e-6, abs=16)
        without = kv_room.kv_blocks(stateless, float(u.kv_gib[i]) * (1 << 30), kv_dtype="bfloat16",
                                    dtype="bfloat16", block_size=block, max_num_seqs=seqs,
                                    tensor_parallel=tp)
        states = 3 * seqs * QWEN3_NEXT.state_bytes_per_sequence("bfloat16") // tp  # live and checkpoints
        per_block = kv_room.rank_kv_bytes_per_token(QWEN3_NEXT, "bfloat16", tp) * block
        assert u.kv_tokens[i] / block == pytest.approx(without - states / per_block, abs=2)
        seen.add((seqs, tp))
    assert seen == {(16, 2), (128, 2)}  # 159 GB of bf16 weights: two H200s
    # deployable split, colocated and in disaggregated pools (whose hand-offs gather the
    # states whole from the ranks)
    assert (u.deployable & u.mem_ok & (u.tp == 2)).any()
    for role in ("prefill", "decode"):
        pool = planner.tables[role][0]
        assert (pool.deployable & pool.mem_ok & (pool.tp == 2)).any()


def test_the_simulator_reserves_and_ships_a_hybrids_states(tmp_path):
    """A hybrid pool's blocks come after its states (a batch cap whose states fill
    kv_cache_memory_gb is refused, naming the settings), and each hand-off carries
    the request's states beside its KV."""
    from splitserve.cluster.bench.datasets import parse_length_dist
    from splitserve.cluster.config import parse_config
    from splitserve.cluster.planning.sim.options import SimConfigError, SimOptions
    from splitserve.cluster.planning.sim.simulator import Simulation
    from splitserve.cluster.planning.workload import synthetic

    def config(seqs):
        pool = {"min_replicas": 1, "max_replicas": 1, "num_gpus": 2}
        return parse_config({"name": "hybrid", "models": [{
            "model": {"name": "q", "path": "/nowhere/q", "dtype": "bfloat16", "kv_cache_memory_gb": 8,
                      "max_num_seqs": seqs, "max_num_batched_tokens": 2048},
            "prefill": pool, "decode": pool}], "router": {"local_prefill_max_tokens": 16}})

    db = ProfileDB(tmp_path / "p.db")
    wl = lambda: synthetic(4.0, parse_length_dist("uniform:64:512"), parse_length_dist("8"),  # noqa: E731
                           seed=0, num_requests=12)
    hw = lambda m, r: "h200"  # noqa: E731
    refused = "kv_cache_memory_gb 8.0 cannot hold the recurrent states of 192"
    with pytest.raises(SimConfigError, match=refused):
        Simulation(config(64), {"q": QWEN3_NEXT}, hw, db, wl())  # 192 x 74 MiB > 8 GiB
    sim = Simulation(config(16), {"q": QWEN3_NEXT}, hw, db, wl(), SimOptions(seed=0))
    want = kv_room.kv_blocks(QWEN3_NEXT, 8 << 30, kv_dtype="bfloat16", dtype="bfloat16",
                             block_size=16, max_num_seqs=16)
    assert {p.num_blocks for p in sim.pools.values()} == {want}
    assert want < (8 << 30) // (16 * QWEN3_NEXT.kv_bytes_per_token("bfloat16")) - 1000
    sent = []
    transfer = sim.network.transfer
    sim.network.transfer = lambda src, dst, nbytes, done: (sent.append(nbytes),
                                                            transfer(src, dst, nbytes, done))
    assert sim.run().record["summary"]["completed"] == 12
    state = QWEN3_NEXT.state_bytes_per_sequence("bfloat16")
    kv = QWEN3_NEXT.kv_bytes_per_token("bfloat16")
    assert sent and all(n > state and (n - state) % kv == 0 for n in sent)


def test_an_fp8_checkpoints_shape_says_so_and_keeps_its_own_key(tiny_checkpoints, tmp_path):
    from tests.fixtures.fp8_checkpoints import write_fp8_checkpoint

    plain = shape_from_config_json(tiny_checkpoints["mixtral"])
    fp8 = shape_from_config_json(write_fp8_checkpoint(tiny_checkpoints["mixtral"],
                                                      tmp_path / "fp8", "fp8_block", block=8))
    assert fp8.fp8_weights and not plain.fp8_weights
    assert (fp8.params_total, fp8.params_active, fp8.params_routed) == (
        plain.params_total, plain.params_active, plain.params_routed)
    twin = dataclasses.replace(fp8, name=plain.name, fp8_weights=False)
    assert fp8.key.split("@")[1] != plain.key.split("@")[1] and twin.key == plain.key
    with ProfileDB(tmp_path / "p.db") as db:
        db.put_model(plain), db.put_model(fp8)
        assert db.model(fp8.key) == fp8 and db.model(plain.key) == plain
