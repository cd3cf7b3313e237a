"""Hybrid models (a recurrent state per sequence beside the paged KV cache:
Qwen3-Next's Gated DeltaNet layers, Kimi Linear's KDA layers, the LFM2 family's short
convolutions, Mamba-2 layers, RecurrentGemma's RG-LRU blocks) through ``LLMEngine`` against
transformers on tiny random checkpoints, in float32: greedy tokens with
chunked prefill, decoding batched beside prompt chunks, preemption by
recompute, prompt logprobs through the prompt-scoring path; states freed
with their sequences; prefix-cache hits resumed from state checkpoints (and
off without them); the options hybrids refuse; the prefill->decode hand-off
carrying the states."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import msgspec
import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import CheckpointError, IncompatibleKVError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.spec.config import SpeculativeConfig
from splitserve.engine.spec.proposer import Proposer, register_proposer
from splitserve.handoff.messages import HandoffMeta
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.fixtures.handoff import export_layers, export_meta, handoff_generate, import_kv

HYBRID_VARIANTS = ("qwen3_next", "kimi_linear", "qwen3_5", "qwen3_5_moe", "olmo_hybrid", "lfm2", "lfm2_moe",
                   "lfm3", "granitemoehybrid", "granitemoehybrid_dense", "bamba", "nemotron_h",
                   "recurrent_gemma", "mamba", "falcon_mamba", "jamba", "minimax", "bailing_hybrid",
                   "falcon_h1", "zamba2", "mamba2")
# speculative decoding's rollback tested on one variant per recurrent layer kind; those whose
# recurrent layers keep no verify chunk's states refuse it (test_refusals)
SPECULATING = ("qwen3_next", "kimi_linear", "olmo_hybrid", "lfm2", "granitemoehybrid", "recurrent_gemma", "mamba",
               "minimax", "bailing_hybrid", "falcon_h1", "zamba2")
NO_SPECULATION: tuple[str, ...] = ()
# a prompt past one delta-rule chunk (64 tokens), and short ones
PROMPTS = [[5, 9, 13], [7] * 9, list(range(20, 37)), [(i * 37) % 400 + 3 for i in range(83)]]


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), **{"num_blocks": 96, "block_size": 4, **kw}))


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    cache = {}

    def get(variant):
        if variant not in cache:
            ref = hf_model(tiny_checkpoints[variant])
            cache[variant] = (ref, hf_greedy(ref, PROMPTS, 6))
        return cache[variant]
    return get


@pytest.mark.parametrize("variant", HYBRID_VARIANTS)
@pytest.mark.parametrize("budget", [8, 512])
def test_engine_greedy_matches_transformers(tiny_checkpoints, references, variant, budget):
    # budget 8: prompts in chunks of 8 mixed with decoding sequences; 512: whole prompts
    _, want = references(variant)
    eng = engine(tiny_checkpoints[variant], max_num_batched_tokens=budget)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(PROMPTS, params)] == want
    # one at a time, on slots other sequences used before: the states start over
    assert [eng.generate([p], params)[0].token_ids for p in PROMPTS[:2]] == want[:2]
    assert eng.kv.all_free()


@pytest.mark.parametrize("variant", HYBRID_VARIANTS)
def test_preemption_recomputes_the_state(tiny_checkpoints, references, variant):
    # four 15-token prompts fit 24 blocks of 4 tokens, their 27-token ends do not: the
    # latest admitted are preempted as the others grow, and recomputed from their first token
    ref, _ = references(variant)
    prompts = [[(i * 7 + j * 11) % 300 + 3 for j in range(15)] for i in range(4)]
    want = hf_greedy(ref, prompts, 12)
    eng = engine(tiny_checkpoints[variant], num_blocks=24, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
    assert eng.scheduler.num_preemptions > 0
    # the preempted one resumed from the checkpoint at its prompt's last full block (12)
    assert eng.kv.checkpoints.restored > 0
    assert eng.kv.all_free()


@pytest.mark.parametrize("variant", HYBRID_VARIANTS)
def test_prompt_logprobs_match_transformers(tiny_checkpoints, references, variant):
    ref, _ = references(variant)
    prompt = PROMPTS[3]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    want = logits[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    eng = engine(tiny_checkpoints[variant], max_num_batched_tokens=16)
    out = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


# one variant per recurrent kind: Gated DeltaNet, Mamba-2, short convolution, Mamba-1 (no
# attention layer: its blocks only count tokens, their hashes still key the checkpoints)
PREFIX_CACHING = ("qwen3_next", "mamba2", "lfm2", "mamba")
SHARED = PROMPTS[3][:42]  # 42 tokens: chunks of 16 end on block boundaries at 16 and 32


def _chat_prompts(want_first: list[int]) -> list[list[int]]:
    """A prompt, another with the same 42-token head, and a follow-up turn
    resending the first with its reply (``want_first``)."""
    first = SHARED + [11, 12, 13, 14, 15]
    return [first, SHARED + [201, 202, 203], first + want_first + [31, 32, 33, 34, 35, 36, 37]]


def _hf_logprobs(ref, prompt: list[int], out: list[int]) -> torch.Tensor:
    """transformers' log-probabilities of each token of ``out`` after ``prompt``."""
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + out])).logits[0].float().log_softmax(-1)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(out) - 1)
    return logits[rows, torch.tensor(out)]


@pytest.mark.parametrize("variant", PREFIX_CACHING)
def test_prefix_hits_resume_from_state_checkpoints(tiny_checkpoints, references, variant):
    # the first prompt runs alone; then a prompt sharing its head resumes from the checkpoint
    # at a chunk end (32 tokens), the follow-up turn from the one at the first prompt's last
    # full block (44): transformers' tokens and log-probabilities, computed from the copies
    ref, _ = references(variant)
    first = _chat_prompts([])[0]
    prompts = _chat_prompts(hf_greedy(ref, [first], 6)[0])
    want = hf_greedy(ref, prompts, 6)
    eng = engine(tiny_checkpoints[variant], max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    got = eng.generate(prompts[:1], params) + eng.generate(prompts[1:], params)
    assert [r.token_ids for r in got] == want
    assert [r.num_cached_tokens for r in got] == [0, 32, 44]
    assert eng.kv.checkpoints.restored == 2
    for p, r in zip(prompts, got):
        lps = torch.tensor([lp.logprob for lp in r.logprobs])
        torch.testing.assert_close(lps, _hf_logprobs(ref, p, r.token_ids), atol=2e-4, rtol=0)
    eng.kv.check_invariants()
    assert eng.kv.all_free()


def test_prefix_caching_off_without_state_checkpoints(tiny_checkpoints, references):
    _, want = references("qwen3_next")
    eng = engine(tiny_checkpoints["qwen3_next"], max_num_batched_tokens=64, state_checkpoints=0)
    assert eng.kv.checkpoints is None and not eng.kv.pool.enable_prefix_caching
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for _ in range(2):  # the same prompt again: computed again, never read from a cache
        out = eng.generate([PROMPTS[3]], params)[0]
        assert out.token_ids == want[3]
        assert out.num_cached_tokens == 0
    assert eng.kv.states.all_free() and eng.kv.all_free()


# prompt -> its reference continuation, for the proposer below
_ORACLE: dict[tuple[int, ...], list[int]] = {}


class _OracleProposer(Proposer):
    """Drafts the reference continuation with its last draft changed: each
    verify step accepts all but the last draft and rejects that one (the
    engine's own proposers are tested in test_spec_engine; this one makes a
    rejection certain on random weights)."""

    cost_per_position = False

    def propose(self, seqs, num_tokens):
        out = []
        for s, k in zip(seqs, num_tokens):
            ref = _ORACLE.get(tuple(s.prompt_token_ids), [])
            d = list(ref[s.num_output_tokens:s.num_output_tokens + k])
            if len(d) >= 2:
                d[-1] = (d[-1] + 1) % 400 + 3
            out.append(d)
        return out


register_proposer("test_oracle_hybrid")(lambda cfg, ctx: _OracleProposer())


@pytest.mark.parametrize("variant", SPECULATING)
def test_speculative_decoding_rolls_the_state_back(tiny_checkpoints, references, variant):
    # every verify step rejects a draft after accepting others: the states after the accepted
    # drafts are put back, so greedy output stays transformers'
    ref, want = references(variant)
    _ORACLE.update({tuple(p): w for p, w in zip(PROMPTS, want)})
    eng = engine(tiny_checkpoints[variant], max_num_batched_tokens=64, speculative=SpeculativeConfig(
        method="test_oracle_hybrid", num_speculative_tokens=3, adaptive=False))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(PROMPTS, params)] == want
    c = eng.spec.counters
    assert c.accepted_tokens > 0 and c.draft_tokens > c.accepted_tokens
    assert eng.kv.all_free()
    # n-gram lookup too (on these random weights it rarely finds a run): the same tokens
    eng = engine(tiny_checkpoints[variant], speculative=SpeculativeConfig(method="ngram"))
    assert [r.token_ids for r in eng.generate(PROMPTS, params)] == want


def test_refusals(tiny_checkpoints, monkeypatch):
    from splitserve.engine.models.gated_delta_net import GatedDeltaNet

    path = tiny_checkpoints["qwen3_next"]
    with monkeypatch.context() as m:  # a recurrent layer that cannot roll drafts back
        m.setattr(GatedDeltaNet, "keeps_verify_states", False)
        with pytest.raises(CheckpointError, match="cannot roll rejected drafts back"):
            engine(path, speculative=SpeculativeConfig(method="ngram"))
    with pytest.raises(CheckpointError, match="cannot draft here"):
        engine(tiny_checkpoints["llama"], speculative=SpeculativeConfig(
            method="draft", draft_model=str(path), num_speculative_tokens=2))
    # LoRA: Qwen3-Next, Qwen3.5, OLMo Hybrid and the Mamba-2 hybrids take adapters
    # (tests/unit/test_lora_engine.py);
    # the other hybrids refuse them, Kimi Linear's delta-rule layers included
    with pytest.raises(CheckpointError, match="not supported for KimiLinearForCausalLM .a hybrid"):
        engine(tiny_checkpoints["kimi_linear"], max_loras=1)
    for variant in NO_SPECULATION:
        with pytest.raises(CheckpointError, match="cannot roll rejected drafts back"):
            engine(tiny_checkpoints[variant], speculative=SpeculativeConfig(method="ngram"))


@pytest.mark.parametrize("variant", HYBRID_VARIANTS)
def test_handoff_carries_the_recurrent_state(tiny_checkpoints, references, variant):
    # prefill on one engine, the KV blocks and the states (through their wire form) into
    # another, decoding there: transformers' tokens
    _, want = references(variant)
    src = engine(tiny_checkpoints[variant], max_num_batched_tokens=16)
    dst = engine(tiny_checkpoints[variant])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert handoff_generate(src, dst, PROMPTS, params) == want
    assert src.kv.all_free() and dst.kv.all_free()
    if variant == "qwen3_next":
        # again: the prefill side resumes from its checkpoints and still exports the state after
        # the whole prompt; the decode side reserves over the blocks it cached, taking the state
        # that comes with the hand-off
        assert handoff_generate(src, dst, PROMPTS[1:], params) == want[1:]  # those with a full block
        assert src.kv.checkpoints.restored == 3 and dst.kv.pool.hits == 3
        assert src.kv.all_free() and dst.kv.all_free()


def test_handoff_without_the_state_is_refused(tiny_checkpoints):
    src = engine(tiny_checkpoints["qwen3_next"])
    dst = engine(tiny_checkpoints["qwen3_next"])
    src.add_request("r", prompt_token_ids=PROMPTS[2], params=SamplingParams(max_tokens=4),
                    prefill_only=True)
    while src.has_unfinished():
        src.step()
    meta = msgspec.msgpack.decode(msgspec.msgpack.encode(export_meta(src, "r")), type=HandoffMeta)
    assert [s.name for s in meta.state] == ["conv", "recurrent"]
    buf = export_layers(src, "r", 0, src.model_cfg.num_cache_layers)
    stripped = msgspec.structs.replace(meta, state=None)
    with pytest.raises(IncompatibleKVError, match="carries recurrent states"):
        import_kv(dst, stripped, buf)
    bad = msgspec.structs.replace(meta, state=[meta.state[0], msgspec.structs.replace(
        meta.state[1], data=meta.state[1].data[:-4])])
    with pytest.raises(IncompatibleKVError, match="bytes for shape"):
        import_kv(dst, bad, buf)
    assert dst.kv.all_free()  # each refused import freed its reservation
    first = import_kv(dst, meta, buf)[1]
    assert first.new_token_ids
    src.kv_port.release("r")
    assert src.kv.all_free()


def test_state_too_large_for_a_handoff_is_refused_at_start(tiny_checkpoints, monkeypatch):
    # Mamba's states ride in the reply (no KV layer, no chunk), bounded by its size;
    # Qwen3-Next's go as a chunk over the KV transport, unbounded
    from splitserve.handoff import protocol

    mamba, hybrid = engine(tiny_checkpoints["mamba"]), engine(tiny_checkpoints["qwen3_next"])
    protocol.check_state_fits(mamba.kv_port)  # a few KiB
    monkeypatch.setattr(protocol, "MAX_STATE_BYTES", 1024)
    assert mamba.kv_port.spec().state_bytes > 1024 < hybrid.kv_port.spec().state_bytes
    with pytest.raises(IncompatibleKVError, match="serve this model colocated"):
        protocol.check_state_fits(mamba.kv_port)
    protocol.check_state_fits(hybrid.kv_port)


def test_planner_shape_counts_only_the_attention_layers_kv(tiny_checkpoints):
    from splitserve.cluster.planning.shapes import shape_from_config_json

    shape = shape_from_config_json(tiny_checkpoints["qwen3_next"])
    assert shape.num_layers == 4 and shape.num_cache_layers == 2
    assert shape.kv_bytes_per_token("float32") == 2 * 2 * 2 * 16 * 4  # 2 layers, 2 KV heads of 16
    dense = shape_from_config_json(tiny_checkpoints["llama"])
    assert dense.num_cache_layers == 0
    # a shape with every layer cached keeps the database key it had before the field (and
    # before the parameter counts, the state sizes and the context length)
    first = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
             "vocab_size", "num_experts", "experts_per_token", "tie_word_embeddings")
    fields = {k: v for k, v in dataclasses.asdict(dense).items() if k in first}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    assert dense.key == f"{dense.name}@{digest}"
    assert shape.key != dataclasses.replace(shape, num_cache_layers=0).key


def test_state_memory_comes_out_of_the_kv_budget(tiny_checkpoints):
    from splitserve.engine.model_runner import num_kv_blocks

    from splitserve.engine.loader import load_checkpoint

    path = tiny_checkpoints["qwen3_next"]
    mc = load_checkpoint(path).model_config
    per_seq = mc.options.hybrid.state_bytes_per_sequence(4)
    cfg = EngineConfig(model=str(path), kv_cache_memory_gb=0.01, max_num_seqs=8, block_size=4)
    per_block = mc.kv_bytes_per_token(torch.float32) * 4
    # 16 live slots (twice max_num_seqs) and 8 state checkpoints (max_num_seqs by default)
    want = (int(0.01 * (1 << 30)) - 24 * per_seq) // per_block
    assert num_kv_blocks(cfg, mc, torch.float32, torch.float32) == want
    live_only = (int(0.01 * (1 << 30)) - 16 * per_seq) // per_block
    for off in (dataclasses.replace(cfg, state_checkpoints=0),
                dataclasses.replace(cfg, enable_prefix_caching=False)):
        assert num_kv_blocks(off, mc, torch.float32, torch.float32) == live_only
    small = EngineConfig(model=str(path), kv_cache_memory_gb=per_seq * 23 / (1 << 30), max_num_seqs=8)
    with pytest.raises(ValueError, match="states of 24 sequences .* lower max_num_seqs or state_checkpoints"):
        num_kv_blocks(small, mc, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="state_checkpoints must be >= 0"):
        EngineConfig(model=str(path), state_checkpoints=-1)


def test_bf16_prompt_logprobs_near_transformers(tmp_path, tiny_tokenizer_dir, tiny_checkpoints):
    # both sides in bf16 on a bf16 checkpoint: the Gated DeltaNet layers round as transformers'
    # do (bit for bit on their own); the sparse MLP sums its experts in float32 (Qwen2-MoE's
    # difference, tests/unit/test_bf16_parity.py), so the log-probabilities end within 0.25
    # (0.17 measured; the same checkpoint in float32 differs from bf16 transformers by 2.2)
    import transformers

    from tests.fixtures.checkpoints import VARIANTS, variant_kwargs, write_hf_checkpoint

    cls, _, seed, _ = VARIANTS["qwen3_next"]
    path = write_hf_checkpoint(tmp_path / "bf16", cls, variant_kwargs("qwen3_next", tiny_checkpoints.vocab_size),
                               seed, {"dtype": torch.bfloat16}, tiny_tokenizer_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    prompt = PROMPTS[3]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    want = logits[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    eng = engine(path, dtype="bfloat16", max_num_batched_tokens=16)
    out = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    assert (got - want).abs().max().item() < 0.25


# Qwen3-Next and Qwen3.5 split their Gated DeltaNet layers (test_tp_engine)
@pytest.mark.parametrize("variant", [v for v in HYBRID_VARIANTS
                                     if v not in ("qwen3_next", "qwen3_5", "qwen3_5_moe")])
def test_tensor_parallelism_is_refused(tiny_checkpoints, variant):
    from splitserve.engine.loader import load_checkpoint
    from splitserve.engine.parallel.plan import TensorParallelConfigError, check

    with pytest.raises(TensorParallelConfigError, match="cannot run at tensor_parallel_size 2"):
        check(load_checkpoint(tiny_checkpoints[variant]).model_config, 2)
