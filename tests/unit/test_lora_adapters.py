"""Adapter configs, layouts and device slots, without a model.

``parse_adapter_config`` refuses each unserved PEFT feature naming its
field, and resolves per-module rank and scaling as PEFT does;
``adapter_layout`` checks tensor names and shapes against a model config;
``SlotTable`` assigns slots least-recently-used first and never evicts an
adapter a running sequence holds; the scheduler keeps a sequence whose
adapter has no slot waiting while base-model sequences go ahead.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.hashing import ROOT_HASH, adapter_root_hash, block_hashes
from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.lora.adapter import (AdapterError, AdapterRef, parse_adapter_config,
                                            read_adapter_config)
from splitserve.engine.lora.layout import adapter_layout
from splitserve.engine.lora.slots import SlotTable
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import FinishReason, Sequence

BASE = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "use_dora": False,
        "target_modules": ["q_proj", "v_proj"], "modules_to_save": None}


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("bias", "all"), ("bias", "lora_only"), ("modules_to_save", ["lm_head"]),
    ("lora_bias", True), ("trainable_token_indices", [1, 2]),
    ("target_parameters", ["experts.gate_up_proj"]), ("peft_type", "IA3"),
    ("target_modules", ["q_proj", "embed_tokens"]), ("target_modules", ["lm_head"]),
    ("layer_replication", [[0, 1]]), ("r", 0),
])
def test_unserved_features_are_refused_by_field(field, value):
    with pytest.raises(AdapterError) as e:
        parse_adapter_config({**BASE, field: value})
    assert e.value.param == field and field in str(e.value)


def test_a_config_nested_past_the_stack_is_refused_naming_the_path(tmp_path):
    # json.loads raised RecursionError: a 500 on POST /v1/load_lora_adapter
    (tmp_path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="invalid JSON: RecursionError") as e:
        read_adapter_config(tmp_path)
    assert e.value.param == "lora_path"


def _nan_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = math.nan
    return t


@pytest.mark.parametrize("what, make, match", [
    ("int8", lambda t: t.to(torch.int8), "is I8; adapter weights must be floating point"),
    ("bool", lambda t: t > 0, "is BOOL"),
    ("nan", _nan_at, "holds NaN or infinite values"),
    ("inf", lambda t: t.index_fill(0, torch.tensor([1]), -math.inf), "holds NaN or infinite values"),
])
def test_weights_that_are_not_finite_floats_are_refused_naming_the_tensor(tmp_path, what, make, match):
    """At registration (the load route: a 400 naming lora_path) and when a
    replica reads the adapter, which once cast them to garbage weights."""
    from safetensors.torch import save_file

    from splitserve.cluster.api.adapter_registry import AdapterRegistry, BaseFacts
    from splitserve.engine.lora.adapter import describe_adapter
    from splitserve.engine.lora.weights import load_adapter

    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=gen) for k, shape in pair(0, "q_proj", 4, 32, 32).items()}
    bad = next(k for k in tensors if "lora_B" in k)
    (tmp_path / "adapter_config.json").write_text(json.dumps(BASE))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    ref = describe_adapter("ok", tmp_path)
    assert load_adapter(ref, model_cfg(), 8, torch.float32).modules  # the same adapter, finite: served
    save_file({**tensors, bad: make(tensors[bad])}, str(tmp_path / "adapter_model.safetensors"))
    reg = AdapterRegistry({"m": BaseFacts(model_cfg(), max_loras=2, max_lora_rank=8)})
    with pytest.raises(AdapterError, match=match) as e:
        reg.check("bad", str(tmp_path))
    assert e.value.param == "lora_path" and bad in str(e.value)
    with pytest.raises(AdapterError, match=match):
        load_adapter(describe_adapter("bad", tmp_path), model_cfg(), 8, torch.float32)


def test_rank_and_scaling_per_module():
    cfg = parse_adapter_config({**BASE, "rank_pattern": {"o_proj": 2, r"layers\.1\.self_attn\.q_proj": 8},
                                "alpha_pattern": {"down_proj": 3}})
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert cfg.rank_of(q0) == 4 and cfg.scaling_of(q0) == 2.0
    assert cfg.rank_of(q1) == 8 and cfg.scaling_of(q1) == 1.0
    assert cfg.rank_of("model.layers.0.self_attn.o_proj") == 2
    assert cfg.scaling_of("model.layers.0.self_attn.o_proj") == 4.0
    assert cfg.scaling_of("model.layers.0.mlp.down_proj") == 0.75
    rs = parse_adapter_config({**BASE, "use_rslora": True, "target_modules": "all-linear"})
    assert rs.scaling_of(q0) == pytest.approx(8 / math.sqrt(4))


def model_cfg(moe: bool = False) -> ModelConfig:
    hf = {"architectures": ["Qwen3MoeForCausalLM" if moe else "LlamaForCausalLM"],
          "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    if moe:
        hf.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  mlp_only_layers=[1])
    return ModelConfig.from_hf(hf)


def pair(layer: int, module: str, r: int, d_in: int, d_out: int) -> dict:
    place = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    stem = f"base_model.model.model.layers.{layer}.{place}.{module}"
    return {f"{stem}.lora_A.weight": (r, d_in), f"{stem}.lora_B.weight": (d_out, r)}


def test_layout_reads_projections_and_refuses_what_fits_none():
    cfg = parse_adapter_config(BASE)
    shapes = {**pair(0, "q_proj", 4, 32, 32), **pair(1, "v_proj", 4, 32, 16),
              **pair(1, "down_proj", 4, 48, 32)}
    layout = adapter_layout(cfg, shapes, model_cfg(), max_rank=8)
    assert sorted(layout.modules) == [(0, "q_proj"), (1, "down_proj"), (1, "v_proj")]
    assert layout.modules[(0, "q_proj")].scaling == 2.0 and layout.max_rank == 4
    bad = {
        "embedding": {"base_model.model.model.embed_tokens.lora_embedding_A": (4, 64)},
        "DoRA": {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": (32,)},
        "layer 5": pair(5, "q_proj", 4, 32, 32),
        "fit rank": pair(0, "k_proj", 4, 32, 32),  # k is [16, 32] on this model
        "no lora_B": dict(list(pair(0, "q_proj", 4, 32, 32).items())[:1]),
        "max_lora_rank": pair(0, "q_proj", 4, 32, 32),
    }
    for what, tensors in bad.items():
        with pytest.raises(AdapterError, match=what):
            adapter_layout(cfg, tensors, model_cfg(), max_rank=2 if what == "max_lora_rank" else 8)


def test_moe_layers_take_lora_on_attention_and_dense_mlp_only():
    cfg, moe = parse_adapter_config(BASE), model_cfg(moe=True)
    ok = {**pair(0, "q_proj", 4, 32, 32), **pair(1, "gate_proj", 4, 32, 48)}  # layer 1 is dense
    assert len(adapter_layout(cfg, ok, moe, 8).modules) == 2
    with pytest.raises(AdapterError, match="mixture-of-experts"):
        adapter_layout(cfg, pair(0, "gate_proj", 4, 32, 48), moe, 8)
    expert = {"base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_A.weight": (4, 32)}
    with pytest.raises(AdapterError, match="MoE experts"):
        adapter_layout(cfg, expert, moe, 8)


def test_an_ungated_mlp_takes_lora_by_its_own_names():
    """StarCoder2's MLP is c_fc / c_proj: their LoRA lands on the ungated MLP's
    up and down; an adapter naming gate/up/down_proj (trained for another
    base) is refused by name, not failed when written. GPT-NeoX's layers are
    gpt_neox.layers.<i>, its attention output ``dense`` (o_proj); its fused
    query_key_value's lora_B rows go to q/k/v by head, as its weight does."""
    cfg = parse_adapter_config(BASE)
    shape = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4}
    sc2 = ModelConfig.from_hf({"architectures": ["Starcoder2ForCausalLM"], **shape, "num_key_value_heads": 2})
    mlp = {f"base_model.model.model.layers.1.mlp.{n}.lora_{ab}.weight": s
           for n, a, b in (("c_fc", 32, 48), ("c_proj", 48, 32)) for ab, s in (("A", (4, a)), ("B", (b, 4)))}
    layout = adapter_layout(cfg, {**pair(0, "q_proj", 4, 32, 32), **mlp}, sc2, 8)
    assert set(layout.modules) == {(0, "q_proj"), (1, "c_fc"), (1, "c_proj")}
    with pytest.raises(AdapterError, match="Starcoder2ForCausalLM's MLP is ungated \\(c_fc / c_proj\\): "
                                           "it has no up_proj"):
        adapter_layout(cfg, {**pair(0, "q_proj", 4, 32, 32), **pair(1, "up_proj", 4, 32, 48)}, sc2, 8)
    neox = ModelConfig.from_hf({"architectures": ["GPTNeoXForCausalLM"], **shape})
    stem = "base_model.model.gpt_neox.layers.0"
    ok = {f"{stem}.attention.dense.lora_A.weight": (4, 32), f"{stem}.attention.dense.lora_B.weight": (32, 4),
          f"{stem}.mlp.dense_4h_to_h.lora_A.weight": (4, 48), f"{stem}.mlp.dense_4h_to_h.lora_B.weight": (32, 4)}
    assert set(adapter_layout(cfg, ok, neox, 8).modules) == {(0, "o_proj"), (0, "dense_4h_to_h")}
    qkv = {f"{stem}.attention.query_key_value.lora_A.weight": (4, 32),
           f"{stem}.attention.query_key_value.lora_B.weight": (96, 4)}
    parts = adapter_layout(cfg, qkv, neox, 8).modules
    assert [(parts[(0, n)].b_rows, parts[(0, n)].b_period) for n in ("q_proj", "k_proj", "v_proj")] \
        == [((0, 8), 24), ((8, 8), 24), ((16, 8), 24)]
    with pytest.raises(AdapterError, match="do not fit"):
        adapter_layout(cfg, {**qkv, f"{stem}.attention.query_key_value.lora_B.weight": (32, 4)}, neox, 8)


def test_gpt2_named_families_take_lora_by_transformer_h_paths():
    """GPT-BigCode's multi-query c_attn ([q (n_embd) | k | v]) goes to q/k/v
    as the weight splits; a module the family has not, or a Llama path, is
    refused naming the family's targets (PEFT parity: test_lora_engine)."""
    cfg = parse_adapter_config(BASE)
    bigcode = ModelConfig.from_hf({"architectures": ["GPTBigCodeForCausalLM"], "vocab_size": 64, "n_embd": 32,
                                   "n_layer": 2, "n_head": 4, "n_inner": 48, "n_positions": 64})
    stem = "base_model.model.transformer.h.1"
    ok = {f"{stem}.attn.c_attn.lora_A.weight": (4, 32), f"{stem}.attn.c_attn.lora_B.weight": (48, 4),
          f"{stem}.mlp.c_proj.lora_A.weight": (4, 48), f"{stem}.mlp.c_proj.lora_B.weight": (32, 4),
          f"{stem}.attn.c_proj.lora_A.weight": (4, 32), f"{stem}.attn.c_proj.lora_B.weight": (32, 4)}
    parts = adapter_layout(cfg, ok, bigcode, 8).modules
    assert sorted(parts) == [(1, "c_proj"), (1, "k_proj"), (1, "o_proj"), (1, "q_proj"), (1, "v_proj")]
    assert [(parts[(1, n)].b_rows, parts[(1, n)].b_period) for n in ("q_proj", "k_proj", "v_proj")] \
        == [((0, 32), 48), ((32, 8), 48), ((40, 8), 48)]
    for name in (f"{stem}.attn.q_proj", "base_model.model.model.layers.0.self_attn.q_proj"):
        with pytest.raises(AdapterError, match="GPTBigCodeForCausalLM's LoRA targets are "
                                               "transformer.h.<i>.attn.c_attn, "):
            adapter_layout(cfg, {f"{name}.lora_A.weight": (4, 32)}, bigcode, 8)


def test_hybrid_layers_take_lora_on_the_projections_they_have():
    """Qwen3-Next: q_proj's rows are query and gate (twice the heads' width);
    a Gated DeltaNet layer takes LoRA on its linear_attn projections only, an
    attention layer on its self_attn ones; anything else is refused by name."""
    cfg = parse_adapter_config(BASE)
    nxt = ModelConfig.from_hf({
        "architectures": ["Qwen3NextForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "layer_types": ["linear_attention", "full_attention"],
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "mlp_only_layers": [0]})

    def gdn(module: str, d_in: int, d_out: int) -> dict:
        stem = f"base_model.model.model.layers.0.linear_attn.{module}"
        return {f"{stem}.lora_A.weight": (4, d_in), f"{stem}.lora_B.weight": (d_out, 4)}

    ok = {**pair(1, "q_proj", 4, 32, 64), **pair(1, "o_proj", 4, 32, 32), **pair(0, "down_proj", 4, 48, 32),
          **gdn("in_proj_qkvz", 32, 96), **gdn("in_proj_ba", 32, 8), **gdn("out_proj", 32, 32)}
    assert sorted(adapter_layout(cfg, ok, nxt, 8).modules) == [
        (0, "down_proj"), (0, "in_proj_ba"), (0, "in_proj_qkvz"), (0, "out_proj"), (1, "o_proj"),
        (1, "q_proj")]
    bad = {
        "fit rank": pair(1, "q_proj", 4, 32, 32),  # the query rows alone
        "layer 0 is a gated_delta_net layer, without self_attn": pair(0, "k_proj", 4, 32, 16),
        "linear_attn has no in_proj_qkv ": gdn("in_proj_qkv", 32, 64),  # Qwen3.5's name
        "mixture-of-experts": pair(1, "gate_proj", 4, 32, 48),
        "MoE experts": {"base_model.model.model.layers.1.mlp.shared_expert.up_proj.lora_A.weight": (4, 32)},
        "no lora_A/lora_B weight": {"base_model.model.model.layers.0.linear_attn.conv1d.lora_A.weight": (4, 4)},
    }
    for what, tensors in bad.items():
        with pytest.raises(AdapterError, match=what):
            adapter_layout(cfg, tensors, nxt, 8)
    attn_layer = {k.replace("layers.0", "layers.1"): v for k, v in gdn("out_proj", 32, 32).items()}
    with pytest.raises(AdapterError, match="layer 1 is an attention layer, without linear_attn"):
        adapter_layout(cfg, attn_layer, nxt, 8)


def test_slot_table_lru_never_evicts_a_held_adapter():
    t = SlotTable(2)
    a = t.acquire("a")
    assert a.slot == 0 and a.load and a.evicted is None
    assert t.acquire("b").slot == 1
    assert t.acquire("a").load is False  # resident: no copy
    assert t.acquire("c") is None and not t.can_acquire("c")  # both held
    t.release(1)
    c = t.acquire("c")  # b's slot was idle
    assert (c.slot, c.load, c.evicted) == (1, True, "b")
    t.release(0), t.release(0), t.release(1)
    t.acquire("c"), t.release(1)  # c used after a: a is least recently used
    assert t.acquire("d").evicted == "a"
    assert t.in_use == 1 and sorted(t.resident()) == ["c", "d"]
    with pytest.raises(AssertionError):
        t.release(1)


class Gate:
    """A SlotGate over a SlotTable (the LoraManager without weights)."""

    def __init__(self, n):
        self.table = SlotTable(n)

    def try_acquire(self, seq):
        g = self.table.acquire(seq.adapter.key)
        if g is None:
            return False
        seq.lora_slot = g.slot
        return True

    def release(self, seq):
        if seq.lora_slot >= 0:
            self.table.release(seq.lora_slot)
            seq.lora_slot = -1


def ref(name):
    return AdapterRef(name, f"/adapters/{name}", name * 64)


def test_scheduler_waits_for_a_slot_and_lets_base_requests_pass():
    kv = KVCacheManager(64, 4)
    gate = Gate(1)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, slots=gate)
    seqs = [Sequence(f"s{i}", [1, 2, 3], SamplingParams(max_tokens=4), 4, adapter=ad)
            for i, ad in enumerate([ref("a"), ref("b"), None, ref("a")])]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    # a takes the only slot; b waits; the base request passes; the later "a" waits behind b
    assert [s.seq.seq_id for s in out.scheduled] == ["s0", "s2"]
    assert [s.seq_id for s in sched.waiting] == ["s1", "s3"]
    sched.commit(out)
    sched.finish(seqs[0], FinishReason.STOP)
    out = sched.schedule()  # a's slot is free: b takes it, then "a" waits again
    assert [s.seq.seq_id for s in out.scheduled] == ["s1"]  # (s2 waits for its next token)
    assert seqs[1].lora_slot == 0 and seqs[3].lora_slot == -1
    assert gate.table.resident() == [ref("b").key]


def test_adapter_roots_its_hash_chain():
    tokens = list(range(12))
    base = block_hashes(tokens, 4)
    a = block_hashes(tokens, 4, root=adapter_root_hash("a" * 64))
    b = block_hashes(tokens, 4, root=adapter_root_hash("b" * 64))
    assert len({base[0], a[0], b[0]}) == 3 and not set(base) & set(a)
    seq = Sequence("s", tokens, SamplingParams(), 4, adapter=ref("a"))
    assert seq.block_hashes() == a and ref("a").hash_root != ROOT_HASH
