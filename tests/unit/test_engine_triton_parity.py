"""The engine with every op dispatched to the Triton kernels (run by the
Triton interpreter on CPU) still gives transformers' greedy tokens."""

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels import dispatch
from tests.fixtures.checkpoints import hf_greedy, hf_model

pytest.importorskip("triton")


# qwen2_window: a window of 8 on layer 1; gemma2: on layer 0, with score and logit soft caps;
# phi3_longrope: fused projections, half of each head rotated; granite: scaled scores,
# residual branches and logits; olmo2: post-block norms, q/k norms across all heads;
# gemma3: two RoPE tables (a window of 8 on layer 0), per-head q/k norms; smollm3: a NoPE
# layer, which only skips the rotary op (slow: no kernel runs differently); helium: q/k rows
# reordered for the rotate-half kernel; starcoder2: LayerNorm and the plain MLP (torch ops)
# between kernels, a window of 8; phi: the parallel residual, half of each head rotated;
# gpt_oss: attention sinks in the prefill and decode kernels, a window of 8 on layer 0.
# falcon_alibi: ALiBi's bias in both kernels, over grouped KV heads. youtu: the latent
# cache (one plane, one KV head of width 40, not a power of 2, for 4 query heads) in the
# store, prefill and decode kernels. qwen3_next: its Gated DeltaNet layers' decode steps
# through the gated delta rule's kernel (in place on the state slots) beside gated attention;
# mamba2: its decode steps through the SSM scan's kernel; kimi_linear: the same gated delta
# kernel with a decay per key channel, beside latent attention; mamba: Mamba-1's selective scan
# kernel; minimax: lightning attention's decode steps through the same kernel without a
# correction.
# Ministral (per-layer windows, as qwen2_window), Seed-OSS (biases, as llama_bias), StableLM
# and GPT-NeoX (the parallel residual and partial rotary, as phi), Falcon (q/k/v split at
# load, grouped KV heads) and GPT-J (partial rotary as phi, its q/k rows reordered as helium's)
# run no kernel differently: the interpreter's 3-5 s each would test the same calls again, so
# they are left out.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("family", ["llama", "qwen2_window", "gemma2", "phi3_longrope", "granite",
                                    "olmo2", "gemma3", pytest.param("smollm3", marks=SLOW),
                                    "helium", "starcoder2", "phi", "gpt_oss", "falcon_alibi",
                                    "youtu", "qwen3_next", "mamba2", "kimi_linear", "mamba",
                                    "minimax"])
def test_triton_dispatch_matches_transformers(tiny_checkpoints, monkeypatch, family):
    path = tiny_checkpoints[family]
    model = hf_model(path)
    prompts = [[5, 9, 13], [7] * 9, list(range(20, 37))]
    want = hf_greedy(model, prompts, 4)
    monkeypatch.setenv("SPLITSERVE_KERNELS", "triton")
    assert dispatch.backend_for(torch.device("cpu")) == "triton"
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=32, block_size=4,
                                 max_num_batched_tokens=8))  # chunked prefill + mixed steps
    got = [r.token_ids for r in eng.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0,
                                                                       ignore_eos=True))]
    assert got == want
    assert eng.kv.all_free()
