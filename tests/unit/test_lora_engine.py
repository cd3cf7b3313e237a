"""LoRA adapters in the engine: greedy parity with transformers + PEFT.

Adapters are written by PEFT itself (``tests/fixtures/lora_adapters.py``)
on the tiny checkpoints: different ranks, alphas, rsLoRA, rank/alpha
patterns and target-module sets (attention only, MLP only, all-linear).
Batches mix several adapters and the base model, with fewer device slots
than adapters, so adapters are swapped in and out between and within
runs; outputs must equal PEFT's greedy tokens exactly. Also: the prefix
cache never serves one adapter's blocks to another or to the base model,
a KV hand-off carries its adapter to the decoding engine, the
attention projections of an MoE model take LoRA, and so do the attention,
dense MLP and Gated DeltaNet projections of the Qwen3-Next and Qwen3.5
hybrids and the attention, MLP and Mamba-2 projections of the Mamba-2
hybrids (Bamba, Granite 4.0-H, Falcon-H1, Nemotron-H, Zamba2), and the
attention and ungated MLPs of StarCoder2, Phi, GPT-NeoX, Nemotron, Arcee,
Jais 2 and Apertus by their own module names, and the fused q/k/v of GPT-2,
GPT-BigCode, Falcon, Bloom, MPT and CodeGen (and GPT-J's reordered q/k)
split as their loaders split the weights.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("peft")

from splitserve.engine.config import EngineConfig  # noqa: E402
from splitserve.engine.llm_engine import LLMEngine  # noqa: E402
from splitserve.engine.errors import AdapterError  # noqa: E402
from splitserve.engine.lora.adapter import AdapterUnavailableError, UnknownAdapterError  # noqa: E402
from splitserve.engine.sampling_params import SamplingParams  # noqa: E402
from tests.fixtures.checkpoints import hf_greedy, hf_model  # noqa: E402
from tests.fixtures.handoff import handoff_generate  # noqa: E402
from tests.fixtures.lora_adapters import build_adapter, peft_model  # noqa: E402

pytestmark = pytest.mark.slow  # PEFT builds and runs its references (tens of seconds)

MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
# name -> build_adapter keyword arguments
ADAPTERS = {
    "attn": dict(seed=1, r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")),
    "mlp": dict(seed=2, r=8, lora_alpha=4, target_modules=("gate_proj", "up_proj", "down_proj")),
    "all": dict(seed=3, r=6, lora_alpha=12, target_modules="all-linear", use_rslora=True),
    "patterns": dict(seed=4, r=4, lora_alpha=8, target_modules=("q_proj", "k_proj", "o_proj",
                                                                "down_proj"),
                     rank_pattern={"o_proj": 2, "down_proj": 8}, alpha_pattern={"k_proj": 3}),
}


def prompts(vocab, lengths=(2, 5, 9, 17, 26), seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(k)] for k in lengths]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family(request, tiny_checkpoints, tmp_path_factory):
    """(base checkpoint, adapter name -> folder, prompts, name -> PEFT greedy outputs)."""
    base = tiny_checkpoints[request.param]
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    paths = {n: build_adapter(base, root / n, **kw) for n, kw in ADAPTERS.items()}
    ps = prompts(hf_model(base).config.vocab_size)
    want = {n: hf_greedy(peft_model(base, p), ps, MAX_NEW) for n, p in paths.items()}
    want[None] = hf_greedy(hf_model(base), ps, MAX_NEW)
    for n in ADAPTERS:  # every adapter changes the output
        assert want[n] != want[None], n
    return base, paths, ps, want


def make(path, **kw):
    args = dict(model=str(path), num_blocks=256, block_size=4, max_num_batched_tokens=512,
                max_loras=2, max_lora_rank=8)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


def test_mixed_batch_matches_peft(family):
    base, paths, ps, want = family
    eng = make(base)
    for n, p in paths.items():
        eng.add_adapter(n, str(p))
    names = [*ADAPTERS, None]
    # every prompt under every adapter and the base model, interleaved in one batch
    jobs = [(n, i) for i in range(len(ps)) for n in names]
    got = eng.generate([ps[i] for _, i in jobs], GREEDY, adapters=[n for n, _ in jobs])
    for (n, i), r in zip(jobs, got):
        assert r.token_ids == want[n][i], (n, i)
    # 4 adapters through 2 slots: swapped in more than once each
    assert eng.lora.table.loads > len(ADAPTERS) and eng.lora.table.in_use == 0
    eng.kv.check_invariants()
    assert eng.kv.all_free()


def test_tensor_parallel_ranks_hold_their_parts_of_each_adapter(family):
    # TP 2: q/k/v and gate/up take A whole and their rows of B, o and down their columns
    # of A and B whole (summed by the block's all-reduce); 4 adapters through 2 slots, so
    # slots are rewritten on every rank between steps, and one adapter removed, its slot
    # emptied on every rank; Qwen3's 2 KV heads split one per rank
    base, paths, ps, want = family
    eng = make(base, tensor_parallel_size=2)
    try:
        for n, p in paths.items():
            eng.add_adapter(n, str(p))
        jobs = [(n, i) for i in range(len(ps)) for n in [*ADAPTERS, None]]
        got = eng.generate([ps[i] for _, i in jobs], GREEDY, adapters=[n for n, _ in jobs])
        for (n, i), r in zip(jobs, got):
            assert r.token_ids == want[n][i], (n, i)
        assert eng.lora.table.loads > len(ADAPTERS)
        assert eng.remove_adapter("mlp")
        assert [r.token_ids for r in eng.generate(ps[:2], GREEDY, adapters=["all", None])] == [
            want["all"][0], want[None][1]]
        eng.kv.check_invariants()
    finally:
        eng.close()


def test_one_slot_chunked_prefill_and_preemption(family):
    base, paths, ps, want = family
    eng = make(base, max_loras=1, max_num_batched_tokens=7, num_blocks=24, max_num_seqs=4)
    eng.add_adapter("attn", str(paths["attn"]))
    eng.add_adapter("all", str(paths["all"]))
    jobs = [("attn", 4), (None, 3), ("all", 4), ("attn", 2), (None, 4), ("all", 1)]
    got = eng.generate([ps[i] for _, i in jobs], GREEDY, adapters=[n for n, _ in jobs])
    assert [r.token_ids for r in got] == [want[n][i] for n, i in jobs]
    assert eng.kv.all_free()


def test_prefix_cache_is_per_adapter(family):
    base, paths, ps, want = family
    eng = make(base)
    eng.add_adapter("attn", str(paths["attn"]))
    eng.add_adapter("mlp", str(paths["mlp"]))
    long = ps[-1]
    assert eng.generate([long], GREEDY, adapters=["attn"])[0].token_ids == want["attn"][-1]
    hits = eng.kv.pool.hits
    # the same prompt under the base model and another adapter: no block of "attn" serves them
    assert eng.generate([long], GREEDY)[0].token_ids == want[None][-1]
    assert eng.generate([long], GREEDY, adapters=["mlp"])[0].token_ids == want["mlp"][-1]
    assert eng.kv.pool.hits == hits
    # the same adapter again hits its own blocks
    r = eng.generate([long], GREEDY, adapters=["attn"])[0]
    assert r.token_ids == want["attn"][-1] and r.num_cached_tokens > 0
    assert eng.kv.pool.hits == hits + 1


def test_handoff_carries_the_adapter(family):
    base, paths, ps, want = family
    src, dst = make(base), make(base)
    ref = src.add_adapter("all", str(paths["all"]))  # dst loads it from the path it travels with
    got = handoff_generate(src, dst, ps, GREEDY, adapters=[ref, None, ref, None, ref])
    assert got == [want["all"][0], want[None][1], want["all"][2], want[None][3], want["all"][4]]
    assert src.kv.all_free() and dst.kv.all_free()
    assert ref.key in dst.lora.host  # loaded by the decoding engine


def test_unknown_and_unservable_adapters(family, tmp_path):
    base, paths, ps, _ = family
    eng = make(base)
    with pytest.raises(UnknownAdapterError, match="nope"):
        eng.add_request(None, prompt_token_ids=ps[0], params=GREEDY, adapter="nope")
    plain = make(base, max_loras=0)
    with pytest.raises(AdapterUnavailableError, match="max_loras"):
        plain.add_adapter("attn", str(paths["attn"]))
    ref = eng.add_adapter("attn", str(paths["attn"]))
    assert eng.remove_adapter("attn") and not eng.remove_adapter("attn")
    assert ref.key not in eng.lora.host and eng.requests == {}
    # the files changed under the registered path: refused, not served stale
    (tmp_path / "copy").mkdir()
    for f in paths["attn"].iterdir():
        (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
    moved = eng.add_adapter("copy", str(tmp_path / "copy"))
    eng.remove_adapter("copy")
    cfg = tmp_path / "copy" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"lora_alpha": 8', '"lora_alpha": 9'))
    with pytest.raises(AdapterUnavailableError, match="changed"):
        eng.add_request(None, prompt_token_ids=ps[0], params=GREEDY, adapter=moved)
    # a projection the layout takes but the model keeps no stack for: named, not a KeyError
    del eng.lora.targets[(1, "v_proj")]
    with pytest.raises(AdapterError, match="no adapter on v_proj"):
        eng.add_adapter("attn", str(paths["attn"]))


@pytest.mark.parametrize("variant", ["qwen3_moe", "cohere2_moe", "ernie4_5_moe", "llama4"])
def test_moe_attention_takes_lora(tiny_checkpoints, tmp_path, variant):
    base = tiny_checkpoints[variant]
    path = build_adapter(base, tmp_path / "moe-attn", seed=5, r=4,
                         target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    ps = prompts(hf_model(base).config.vocab_size, lengths=(3, 11, 20))
    want = hf_greedy(peft_model(base, path), ps, MAX_NEW)
    eng = make(base)
    eng.add_adapter("a", str(path))
    got = eng.generate(ps * 2, GREEDY, adapters=["a"] * 3 + [None] * 3)
    assert [r.token_ids for r in got[:3]] == want
    assert [r.token_ids for r in got[3:]] == hf_greedy(hf_model(base), ps, MAX_NEW)
    assert eng.kv.all_free()


@pytest.mark.parametrize("variant", ["granite", "olmo2", "gemma3", "smollm3", "hyperclovax", "helium",
                                     "cohere_qk_norm", "ernie4_5", "cohere2", "phi3", "glm", "glm4",
                                     "gpt_bigcode", "gpt2", "falcon", "gptj", "mpt", "bloom", "codegen"])
def test_granite_olmo2_gemma3_smollm3_take_lora_like_peft(tiny_checkpoints, tmp_path, variant):
    # the same module names as Llama's; Granite (and HyperCLOVA X, after its post-norms)
    # scales the adapted blocks' outputs,
    # OLMo 2 and Gemma 3 norm them after the LoRA delta is added (Gemma 3 per head
    # before RoPE too), SmolLM3 adapts its NoPE layer like the others; Helium, Cohere (its
    # attention and MLP in parallel, per-head q/k norms) and ERNIE 4.5 rotate adjacent pairs:
    # their q/k weights' rows are reordered at load, and so are their adapters' lora_B rows;
    # Phi-3's fused qkv_proj and gate_up_proj (GLM's gate_up_proj, with GLM's partial rotary
    # reordering) are served as parts sharing A; so are the fused q/k/v of GPT-BigCode
    # (multi-query c_attn), GPT-2 (c_attn, on Conv1D), Falcon (query_key_value by KV-head
    # group), MPT (Wqkv), Bloom (query_key_value per head) and CodeGen (qkv_proj's mp_num
    # shards, then GPT-J's q/k row reordering), their MLPs by their own names
    base = tiny_checkpoints[variant]
    adapter = build_adapter(base, tmp_path / "all", **ADAPTERS["all"])
    ps = prompts(hf_model(base).config.vocab_size)
    want = hf_greedy(peft_model(base, adapter), ps, MAX_NEW)
    plain = hf_greedy(hf_model(base), ps, MAX_NEW)
    assert want != plain
    eng = make(base)
    eng.add_adapter("all", str(adapter))
    got = eng.generate(ps + ps, GREEDY, adapters=["all"] * len(ps) + [None] * len(ps))
    assert [r.token_ids for r in got] == want + plain
    assert eng.kv.all_free()


# Qwen3-Next: gated attention (q_proj's query and gate rows) and the Gated DeltaNet's fused
# projections (PEFT writes MLP targets on this MoE model as expert parameters, which are
# refused); Qwen3.5: every linear layer (its Gated DeltaNet's four input projections apart,
# dense MLPs); Qwen3.5-MoE: attention and the Gated DeltaNet; OLMo Hybrid: every linear layer
# (its Gated DeltaNet's q/k/v, g, b, a and o projections apart). The Mamba-2 hybrids: Bamba and
# Granite 4.0-H every linear layer (Granite's fused shared_mlp beside experts and without);
# Falcon-H1 and Nemotron-H all but out_proj, which PEFT refuses on them (Nemotron-H's MLP blocks'
# up/down, not its MoE blocks' shared experts of the same names); Zamba2 the Mamba-2 mixers,
# each hybrid layer's linear and its own LoRA on its use of a shared block (its built-in
# per-use adapters apart)
HYBRID_TARGETS = {
    "bamba": "all-linear",
    "granitemoehybrid": "all-linear",
    "granitemoehybrid_dense": "all-linear",
    "falcon_h1": ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"),
    "nemotron_h": r"model\.layers\.\d+\.mixer\.(q_proj|k_proj|v_proj|o_proj|in_proj|up_proj|down_proj)",
    "zamba2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "linear", "in_proj",
               "out_proj"),
    "olmo_hybrid": "all-linear",
    "qwen3_next": ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"),
    "qwen3_5": "all-linear",
    "qwen3_5_moe": ("q_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                    "out_proj"),
}
MAMBA2_HYBRIDS = ("bamba", "granitemoehybrid", "granitemoehybrid_dense", "falcon_h1", "nemotron_h", "zamba2")
# Zamba2 at alpha 8: its every-projection deltas leave even PEFT's float32 1e-3 from float64 on
# 14-token prompts (wide dt through in_proj); alpha 2 keeps the reference well conditioned
HYBRID_ALPHA = {"zamba2": 2}


# The ungated (plain) MLPs by their own names: StarCoder2's c_fc / c_proj, Phi's fc1 / fc2 (and
# its attention output, dense), GPT-NeoX's dense_h_to_4h / dense_4h_to_h and attention dense
# (its fused query_key_value split by head), the up_proj / down_proj of Nemotron, Arcee, Jais 2,
# Apertus
PLAIN_MLP_TARGETS = {
    "starcoder2": "all-linear",
    "phi": "all-linear",
    "gpt_neox": "all-linear",
    "nemotron": "all-linear",
    "arcee": "all-linear",
    "jais2": "all-linear",
    "apertus": "all-linear",  # the xIELU MLP, PlainMLP's stacks
    "gpt_neox_sequential": "all-linear",  # GPT-NeoX without the parallel residual
    "stablelm_parallel": "all-linear",  # and StableLM's gated MLP behind the parallel residual
}
# the second adapter where the model has no q_proj / v_proj
ATTN_TARGETS = dict.fromkeys(("gpt_neox", "gpt_neox_sequential"), ("query_key_value",))


# and at TP 2, the Gated DeltaNet hybrids that split: each rank its part of every adapter
# (engine.parallel.lora_shards: in_proj_qkv's q, k and v runs, out_proj's columns, ...),
# Arcee's ungated MLP (up_proj's rows, down_proj's columns, as its weights split) and
# GPT-NeoX's (dense_h_to_4h / dense_4h_to_h by their names; query_key_value's q/k/v parts
# and dense as q/k/v and o)
@pytest.mark.parametrize("variant,tp", [(v, 1) for v in sorted(HYBRID_TARGETS)]
                         + [(v, 1) for v in PLAIN_MLP_TARGETS]
                         + [("qwen3_next", 2), ("qwen3_5", 2), ("arcee", 2), ("gpt_neox", 2)])
def test_hybrids_and_plain_mlps_take_lora_like_peft(tiny_checkpoints, tmp_path, request, variant, tp):
    # two adapters and the base model in one batch, through the recurrent layers' state slots
    base = tiny_checkpoints[variant]
    attn = {**ADAPTERS["attn"], "target_modules": ATTN_TARGETS.get(variant, ADAPTERS["attn"]["target_modules"])}
    paths = {"mixed": build_adapter(base, tmp_path / "mixed", seed=6, r=4,
                                    lora_alpha=HYBRID_ALPHA.get(variant, 8),
                                    target_modules={**HYBRID_TARGETS, **PLAIN_MLP_TARGETS}[variant]),
             "attn": build_adapter(base, tmp_path / "attn", **attn)}
    ps = prompts(hf_model(base).config.vocab_size, lengths=(5, 14))
    refs = {n: peft_model(base, p) for n, p in paths.items()}
    refs[None] = hf_model(base)
    want = {n: hf_greedy(m, ps, MAX_NEW) for n, m in refs.items()}
    assert want["mixed"] != want[None] and want["attn"] != want[None]
    eng = make(base, tensor_parallel_size=tp)
    request.addfinalizer(eng.close)
    for n, p in paths.items():
        eng.add_adapter(n, str(p))
    linear = {name for _, name in eng.lora.targets if name.startswith(("in_proj", "out_proj", "g_", "b_", "a_"))}
    mixers = {"qwen3_next": {"in_proj_qkvz", "in_proj_ba", "out_proj"},
              "olmo_hybrid": {"g_proj", "b_proj", "a_proj"},  # with q/k/v/o as attention's
              **dict.fromkeys(MAMBA2_HYBRIDS, {"in_proj", "out_proj"}),
              # no out_proj stack where PEFT adapts none (Falcon-H1, Nemotron-H)
              "falcon_h1": {"in_proj"}, "nemotron_h": {"in_proj"},
              **dict.fromkeys(PLAIN_MLP_TARGETS, set())}
    assert linear == mixers.get(variant, {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"})
    jobs = [(n, i) for i in range(len(ps)) for n in ("mixed", "attn", None)]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    got = eng.generate([ps[i] for _, i in jobs], params, adapters=[n for n, _ in jobs])
    for (n, i), r in zip(jobs, got):
        assert r.token_ids == want[n][i], (n, i)
        # each prompt token's logprob under the request's adapter, as PEFT's logits give it
        p = ps[i]
        with torch.no_grad():
            ref = refs[n](torch.tensor([p])).logits[0].float().log_softmax(-1)
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in r.prompt_logprobs[1:]]),
                                   ref[torch.arange(len(p) - 1), torch.tensor(p[1:])], atol=2e-4, rtol=0)
    assert eng.kv.all_free()
