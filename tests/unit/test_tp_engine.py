"""Tensor parallelism through the engine, on CPU over gloo: a TP=2 engine
(rank 0 here, rank 1 a process it spawns) generates greedily exactly what
transformers does for every dense family, batched with chunked prefill and
prefix-cache hits; MoE families split their experts' intermediate dimension
the same way; Qwen3-Next and Qwen3.5 split their Gated DeltaNet layers and
recurrent states by heads; the all-head q/k norms of OLMo 2, OLMoE and
MiniMax-M2 sum their squares over the ranks; TP=4 replicates the tiny
models' two KV heads (OLMo 2's, each counted once in its k_norm); and the
engine's ranks stop with it."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.handoff.protocol import check_state_fits
from tests.fixtures.checkpoints import COMMON, hf_greedy, hf_model, write_hf_checkpoint

MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
LENGTHS = [1, 3, 5, 9, 16, 17, 33]


def make(path, tp: int, **kw) -> LLMEngine:
    args = dict(model=str(path), num_blocks=128, block_size=4, max_num_batched_tokens=512,
                tensor_parallel_size=tp)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(k)] for k in LENGTHS]


@pytest.fixture
def engines():
    made: list[LLMEngine] = []
    yield made
    for e in made:
        e.close()


def check_parity(path, tp: int, engines, **kw) -> LLMEngine:
    ref = hf_model(path)
    prompts = prompts_for(ref.config.vocab_size)
    want = hf_greedy(ref, prompts, MAX_NEW)
    eng = make(path, tp, **kw)
    engines.append(eng)
    assert [r.token_ids for r in eng.generate(prompts, GREEDY)] == want
    # again: prefix-cache hits on every prompt's full blocks
    assert [r.token_ids for r in eng.generate(prompts, GREEDY)] == want
    eng.kv.check_invariants()
    assert eng.kv.all_free()
    return eng


def check_norm_slices(eng: LLMEngine, tp: int) -> None:
    """Rank 0's all-head q/k norm weights: its query heads' and KV head's slices."""
    attn, cfg = eng.runner.model.layers[0].self_attn, eng.model_cfg
    assert attn.q_norm.weight.shape[0] == cfg.num_heads * cfg.head_dim // tp
    assert attn.k_norm.weight.shape[0] == max(1, cfg.num_kv_heads // tp) * cfg.head_dim


# Mistral without a window is the Llama decoder with Llama's weight names (the
# same split); test_model_parity checks its config at TP=1 and
# test_sliding_window its window.
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "phi3_longrope", "granite",
                                    "gemma3", "smollm3", "ministral", "seed_oss", "helium",
                                    "cohere_qk_norm", "olmo", "glm", "glm4", "cohere2", "arcee",
                                    "exaone4", "hunyuan_dense", "internlm3", "apertus", "mpt",
                                    "exaone", "vaultgemma", "granite_swa", "ministral3", "cwm",
                                    "iquestcoder", "hyperclovax"])
def test_tp2_greedy_parity_with_transformers(tiny_checkpoints, engines, family):
    check_parity(tiny_checkpoints[family], 2, engines)


# The LayerNorm / ungated-MLP families: starcoder2 (c_fc / c_proj, biases), phi (fc1 / fc2,
# dense, parallel residual, partial rotary, the LM head's bias), gpt_neox (query_key_value
# split per head at load, a norm each for the parallel attention and MLP; Nemotron's, Jais 2's
# and nanochat's ungated MLPs split alike), falcon (the grouped query_key_value split at
# load), openai_gpt (a learned position table whole on
# every rank, post-norm blocks, c_attn split)
@pytest.mark.slow
@pytest.mark.parametrize("family", ["starcoder2", "phi", "gpt_neox", "falcon", "openai_gpt"])
def test_tp2_layer_norm_families(tiny_checkpoints, engines, family):
    eng = check_parity(tiny_checkpoints[family], 2, engines)
    mlp = eng.runner.model.layers[0].mlp
    assert mlp.up_proj.out_features == eng.model_cfg.intermediate_size // 2


@pytest.mark.slow
def test_tp2_bloom_blocks_add_to_their_normed_input(tmp_path, tiny_tokenizer_dir, engines):
    # Bloom with apply_residual_connection_post_layernorm: each block's output joins its normed
    # input, so attention's partial sums are reduced first; 4 heads, 2 per rank with their ALiBi
    # slopes, the fused query_key_value split per head, the embeddings' norm whole
    path = write_hf_checkpoint(tmp_path / "bloom", "BloomConfig",
                               {**COMMON, "vocab_size": 512, "apply_residual_connection_post_layernorm": True},
                               120, {}, tiny_tokenizer_dir)
    check_parity(path, 2, engines)


@pytest.mark.slow
def test_tp2_chunked_prefill_bias_and_tied_embeddings(tiny_checkpoints, engines):
    # row-parallel biases added once; tied LM head read from the embedding shard
    check_parity(tiny_checkpoints["llama_bias"], 2, engines, max_num_batched_tokens=8)
    check_parity(tiny_checkpoints["llama_tied"], 2, engines)


@pytest.mark.slow
def test_tp4_replicates_kv_heads(tiny_checkpoints, engines):
    # 4 query heads, 2 KV heads over 4 ranks: each KV head on two ranks; OLMo 2's k_norm
    # over all KV heads counts each once in its sum of squares
    eng = check_parity(tiny_checkpoints["olmo2"], 4, engines)
    assert eng.runner.kv_cache.shape[-2] == 1
    check_norm_slices(eng, 4)


@pytest.mark.slow
# q/k RMSNorms over all heads (OLMoE's, after which q/k/v are clamped; MiniMax-M2's, before
# partial RoPE): each rank norms its heads' slice, the sums of squares all-reduced (OLMo 2's
# at TP 4 in test_tp4_replicates_kv_heads)
@pytest.mark.parametrize("family", ["olmoe", "minimax_m2"])
def test_tp2_all_head_qk_norms_split(tiny_checkpoints, engines, family):
    check_norm_slices(check_parity(tiny_checkpoints[family], 2, engines), 2)


@pytest.mark.slow
# gpt_oss: sinks split too; solar_open: GLM-4.5's grouped router and shared expert in every layer;
# sarvam_moe: its fused query_key_value split at load, then sharded as q/k/v (DBRX's fused
# Wqkv and experts are split the same way at load)
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "llama4", "granitemoe_swa",
                                    "solar_open", "sarvam_moe"])
def test_tp2_moe_experts_split(tiny_checkpoints, engines, family):
    eng = check_parity(tiny_checkpoints[family], 2, engines)
    moe = next(layer.mlp for layer in eng.runner.model.layers if hasattr(layer.mlp, "w_down"))
    assert moe.w_down.shape[2] == eng.model_cfg.moe.expert_intermediate_size // 2


@pytest.mark.slow
# qwen3_5_moe: the Gated DeltaNet's projections stored apart (q|k|v rows in three parts per
# rank), its fused experts split at load (Qwen3.5's dense MLP splits as Llama's); whole prompts
@pytest.mark.parametrize("family,budget", [("qwen3_next", 8), ("qwen3_5_moe", 512)])
def test_tp2_gated_delta_net_hybrids(tiny_checkpoints, engines, family, budget):
    """Gated DeltaNet layers split by key heads, each rank's recurrent states
    its heads'; prompts in chunks of ``budget`` tokens, whose state
    checkpoints every rank copies, and the second pass resumes from them on
    every rank."""
    eng = check_parity(tiny_checkpoints[family], 2, engines, max_num_batched_tokens=budget)
    heads = eng.model_cfg.options.gated_delta_net.num_v_heads
    assert eng.runner.state.tensors["recurrent"].shape[2] == heads // 2
    assert eng.kv.checkpoints.restored > 0
    check_state_fits(eng.kv_port)  # its hand-offs carry the states whole
    if family == "qwen3_next":
        # hand-offs TP=1 -> 2 and 2 -> 1: the states gathered from / scattered to the ranks
        prompt = prompts_for(eng.model_cfg.vocab_size)[-1]
        want = eng.generate([prompt], GREEDY)[0].token_ids
        tp1 = make(tiny_checkpoints[family], 1)
        engines.append(tp1)
        assert asyncio.run(_generate_placed(tp1, eng, prompt)) == (want, 0, 1)
        assert asyncio.run(_generate_placed(eng, tp1, prompt)) == (want, 0, 1)
        whole = eng.kv_port.spec().state_kinds
        with pytest.raises(ValueError, match="does not fit"):  # rank 0's rows alone
            eng.runner.unpack_state(0, {k: t[:, 0] for k, t in eng.runner.state.tensors.items()})
        assert sorted(whole) == ["conv", "recurrent"]
        # a copy rank 0 made before an import into its source slot: the other ranks
        # repeat it before the import too (not with the next step, after it)
        r = eng.runner
        shapes = {k: t.shape for k, t in r.pack_state(0).items()}
        old = {k: torch.randn(sh).to(r.state.tensors[k].dtype) for k, sh in shapes.items()}
        new = {k: torch.randn(sh).to(r.state.tensors[k].dtype) for k, sh in shapes.items()}
        r.unpack_state(0, old)
        r.copy_state(0, 1)
        r.unpack_state(0, new)
        for slot, want_states in ((0, new), (1, old)):
            got = r.pack_state(slot)
            assert all(torch.equal(got[k], want_states[k]) for k in shapes), slot


async def _generate_placed(prefill: LLMEngine, decode: LLMEngine, prompt: list[int]):
    """``prompt`` through a decode worker of ``decode`` with a prefill placement on a
    worker of ``prefill``: (tokens, the decode worker's fallbacks, its hand-offs),
    once every block and state slot of both is free again."""
    from tests.integration.pd_harness import start_pd, wait_until

    pd = await start_pd(prefill, decode)
    try:
        toks, _ = await pd.generate(prompt, GREEDY)
        assert await wait_until(pd.all_free)
        return toks, pd.decode.counters["fallbacks"], pd.decode.counters["handoffs"]
    finally:
        await pd.close()


def test_tp_refuses_a_model_that_does_not_split(tiny_checkpoints):
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\) is not a multiple"):
        make(tiny_checkpoints["llama"], 3)


def test_tp_refuses_a_layer_norm_family_whose_heads_do_not_split(tiny_checkpoints):
    # the tiny Bloom has 3 heads, one KV head each; its LayerNorms and MLP (192 wide) would split
    with pytest.raises(ValueError, match=r"BloomForCausalLM cannot run at tensor_parallel_size 2: "
                                         r"num_attention_heads \(3\) is not a multiple of it; "
                                         r"num_key_value_heads \(3\) neither divides it") as err:
        make(tiny_checkpoints["bloom"], 2)
    assert "intermediate_size" not in str(err.value) and "LayerNorm" not in str(err.value)


@pytest.mark.slow
def test_ranks_stop_with_the_engine(tiny_checkpoints):
    # and exit cleanly (their collectives' threads aborted most of them at exit, before)
    eng = make(tiny_checkpoints["llama"], 2)
    procs = list(eng.runner.tp._procs)
    assert all(p.is_alive() for p in procs)
    eng.generate([[5, 6, 7]], GREEDY)
    eng.close()
    assert [p.exitcode for p in procs] == [0]


@pytest.mark.slow
def test_tp2_verifies_draft_tokens_like_tp1(tiny_checkpoints, engines):
    """Speculative decoding at TP=2: verify steps (a sequence's last token
    and its drafts as one chunk, a logit row each) run on both ranks, and
    the draft model runs unsplit beside rank 0."""
    from splitserve.engine.spec.config import SpeculativeConfig

    path = tiny_checkpoints["llama"]
    ref = hf_model(path)
    # repetitive prompts: n-gram drafts find matches and get accepted
    prompts = [[7, 8, 9, 10] * 4, [3, 4, 5] * 5 + [3]]
    want = hf_greedy(ref, prompts, MAX_NEW)
    for spec in (SpeculativeConfig(method="ngram", num_speculative_tokens=3, adaptive=False),
                 SpeculativeConfig(method="draft", draft_model=str(path), adaptive=False,
                                   num_speculative_tokens=2)):
        eng = make(path, 2, speculative=spec)
        engines.append(eng)
        assert [r.token_ids for r in eng.generate(prompts, GREEDY)] == want
        assert eng.spec.counters.draft_tokens > 0
        eng.kv.check_invariants()
        assert eng.kv.all_free()
