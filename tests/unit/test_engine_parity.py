"""Engine-level greedy parity with transformers ``generate``.

20 prompts of varied lengths, one at a time and batched; identical outputs
with prefix-cache hits, with chunked prefill of several chunk sizes, under
forced preemption, and after exporting KV into a second engine."""

import random

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.fixtures.handoff import handoff_generate

MAX_NEW = 8
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
FAMILIES = ["llama", "qwen3", "gemma", "gemma2", "phi3"]
# Granite, OLMo 2, Gemma 3 and SmolLM3 change only the model's arithmetic
# (test_model_parity checks it token by token): the fast set runs them
# through one engine test, the rest of the matrix is marked slow to keep its
# time down.
MODEL_ONLY_FAMILIES = ["granite", "olmo2", "gemma3", "smollm3"]
# Ministral (a window on layer 0), Seed-OSS, Helium (q/k rows reordered at load),
# StarCoder2 (LayerNorm, plain MLP, windows), Phi (parallel residual, partial RoPE),
# StableLM (LayerNorm, partial RoPE; its parallel residual: test_model_parity), GPT-NeoX
# (fused per-head q/k/v split at load, the parallel residual with two norms): the fast set
# runs each through chunked prefill with prefix-cache hits in one engine
# (test_chunked_prefill_with_prefix_hits), the matrix is slow.
COMBINED_FAMILIES = ["ministral", "seed_oss", "helium", "starcoder2", "phi", "stablelm", "gpt_neox"]
# The families of splitserve.engine.dialects: GPT-2 and OPT (learned positions, no RoPE),
# Falcon (q/k/v split by KV group: GQA, and one KV head with falcon_mq), GPT-J (partial
# interleaved RoPE, q/k rows reordered at load), Cohere (float32 LayerNorms, interleaved
# RoPE, per-head q/k norms, scaled logits), OLMo (parameterless LayerNorms, clamped q/k/v),
# GLM (fused gate_up_proj, half of each head rotated in adjacent pairs), GLM-4 (GLM with
# sandwich norms), Cohere 2 (a window on one layer, no RoPE on the other), Nemotron
# (LayerNorm1P, relu2, partial RoPE), Arcee (Llama with the relu2 MLP), GPT-BigCode
# (learned positions, c_attn split by KV head: multi-query and per head) and GPT-Neo
# (learned positions, unscaled scores, a window of 8 on layer 1), OLMo 3 and EXAONE 4
# (windows of 8 on layer 0; OLMo 3's second RoPE table, EXAONE 4's NoPE layer), ERNIE 4.5
# (interleaved RoPE as Helium's), HunYuan dense (q/k norms after RoPE), InternLM3 (Llama
# with its own bias keys), Apertus (per-head q/k norms, the xIELU MLP), EXAONE 3 (Llama
# under its own tensor names), VaultGemma (Gemma 2 without its post-norms), Granite SWA
# (sinks, windows of 8, a RoPE base per layer, one NoPE), CodeGen (GPT-J with its 4-shard
# fused qkv_proj split at load), Jais 2 (Llama with LayerNorms and the relu2 MLP),
# HyperCLOVA X (Granite's scalars with post-norms, logits multiplied), Youtu (latent
# attention over a one-plane cache of the latent, its hand-off in test_family_deepseek's
# test_latent_cache_size_and_handoff) and Gemma 4 (per-layer head shapes padded into one
# cache width, per-layer input embeddings). Their KV cache layouts are ones the matrix (or
# that test) covers, so each runs test_chunked_prefill_with_prefix_hits only (batched,
# chunked, with prefix-cache hits, in one engine); the live hand-off:
# tests/integration/test_family_handoff.py.
DIALECT_FAMILIES = ["gpt2", "opt", "falcon", "falcon_mq", "gptj", "cohere_qk_norm", "olmo", "glm",
                    "glm4", "cohere2", "nemotron", "arcee", "gpt_bigcode", "gpt_bigcode_mha", "gpt_neo",
                    "olmo3", "exaone4", "ernie4_5", "hunyuan_dense", "internlm3", "apertus",
                    "bloom", "mpt", "falcon_alibi", "exaone", "vaultgemma", "granite_swa", "codegen",
                    "ministral3", "cwm", "iquestcoder", "jais2", "hyperclovax", "youtu", "gemma4",
                    "nanochat", "persimmon", "xglm", "openai_gpt", "biogpt"]
ALL = FAMILIES + MODEL_ONLY_FAMILIES + COMBINED_FAMILIES
MATRIX = FAMILIES + [pytest.param(f, marks=pytest.mark.slow)
                     for f in MODEL_ONLY_FAMILIES + COMBINED_FAMILIES]


def make(path, **kw):
    args = dict(model=str(path), num_blocks=256, block_size=4, max_num_batched_tokens=512)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


def prompt_set(vocab, n=20, seed=0):
    rng = random.Random(seed)
    lengths = [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 20, 23, 31, 32, 33, 40, 47, 60][:n]
    return [[rng.randrange(vocab) for _ in range(k)] for k in lengths]


# test_chunked_prefill_with_prefix_hits runs every other prompt (lengths 2 to 60, block-aligned
# and not): half the engine steps; the families that run nothing else get transformers'
# reference for those prompts alone
HALF = slice(1, None, 2)


@pytest.fixture(scope="module")
def family(request, tiny_checkpoints):
    path = tiny_checkpoints[request.param]
    model = hf_model(path)
    vocab = model.config.vocab_size
    prompts = prompt_set(vocab)
    if request.param not in ALL:
        prompts = prompts[HALF]
    return path, prompts, hf_greedy(model, prompts, MAX_NEW)


def run(eng, prompts, one_at_a_time=False):
    if one_at_a_time:
        return [eng.generate([p], GREEDY)[0].token_ids for p in prompts]
    return [r.token_ids for r in eng.generate(prompts, GREEDY)]


@pytest.mark.parametrize("family", ALL, indirect=True)
def test_one_at_a_time_and_batched(family):
    path, prompts, want = family
    eng = make(path)
    assert run(eng, prompts, one_at_a_time=True) == want
    assert run(eng, prompts) == want
    eng.kv.check_invariants()
    assert eng.kv.all_free()


@pytest.mark.parametrize("family", COMBINED_FAMILIES + DIALECT_FAMILIES, indirect=True)
def test_chunked_prefill_with_prefix_hits(family):
    path, prompts, want = family
    if len(prompts) == len(prompt_set(2)):  # a family of the matrix: its reference holds all
        prompts, want = prompts[HALF], want[HALF]
    eng = make(path, max_num_batched_tokens=5, max_num_seqs=4)
    assert run(eng, prompts) == want  # prompts prefilled in chunks of up to 5 tokens
    h0 = eng.kv.pool.hits
    assert run(eng, prompts) == want  # again: their full blocks now come from the cache
    assert eng.kv.pool.hits - h0 >= 8  # the 8 prompts of more than one block
    eng.kv.check_invariants()
    assert eng.kv.all_free()


@pytest.mark.parametrize("family", MATRIX, indirect=True)
def test_prefix_cache_hits_do_not_change_outputs(family):
    path, prompts, want = family
    eng = make(path)
    run(eng, prompts)  # warm the prefix cache with every prompt
    q0 = eng.kv.pool.queries
    h0 = eng.kv.pool.hits
    assert run(eng, prompts) == want
    assert eng.kv.pool.hits - h0 >= 10 and eng.kv.pool.queries - q0 == 20
    # shared prefixes across different prompts hit too
    shared = [prompts[-1][:40] + p for p in prompts[:5]]
    cold = make(path, enable_prefix_caching=False)
    assert run(eng, shared) == run(cold, shared)
    assert eng.kv.all_free()


@pytest.mark.parametrize("chunk", [3, 16])
@pytest.mark.parametrize("family", MATRIX, indirect=True)
def test_chunked_prefill_sizes(family, chunk):
    path, prompts, want = family
    eng = make(path, max_num_batched_tokens=chunk, max_num_seqs=4)
    assert run(eng, prompts) == want
    assert eng.kv.all_free()


@pytest.mark.parametrize("family", MATRIX, indirect=True)
def test_forced_preemption(family):
    path, prompts, want = family
    # 24 blocks of 4 tokens cannot hold the batch: sequences get preempted
    eng = make(path, num_blocks=24)
    assert run(eng, prompts) == want
    assert eng.scheduler.num_preemptions > 0
    eng.kv.check_invariants()
    assert eng.kv.all_free()


@pytest.mark.parametrize("family", MATRIX, indirect=True)
def test_export_import_into_second_engine(family):
    path, prompts, want = family
    src, dst = make(path), make(path)
    assert handoff_generate(src, dst, prompts, GREEDY) == want
    assert src.kv.all_free() and dst.kv.all_free()


@pytest.mark.parametrize("family", MATRIX, indirect=True)
def test_fp32_logits_match_transformers(family):
    path, prompts, _ = family
    model = hf_model(path)
    eng = make(path)
    for p in prompts[::4]:
        eng.add_request("x", prompt_token_ids=p, params=SamplingParams(max_tokens=1,
                                                                       temperature=0.0))
        sched = eng.scheduler.schedule()
        logits, _, _ = eng.runner.execute(sched.scheduled, eng.kv)
        eng.scheduler.commit(sched)
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0, -1].float()
        torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)
        eng.abort("x")
    assert eng.kv.all_free()
