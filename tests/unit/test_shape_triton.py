"""The engine with every op on the Triton kernels (the interpreter on CPU)
for the shapes of tests.fixtures.shape_variants: head dims that are not
powers of two (80, 96), wide heads (128, 256), MQA/MHA and a group of 3,
odd MLP and expert widths, top-1/top-4 routing, bf16 checkpoints. Greedy
tokens equal transformers' through chunked prefill, mixed prefill+decode
steps and the decode kernel's KV splits."""

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels import dispatch
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.fixtures.shape_variants import SHAPE_VARIANTS, shape_config

pytest.importorskip("triton")

# Shapes whose ops differ from the common shape's: every attention layout and
# head dim, the MLP and expert widths, routing, storage dtype, a vocabulary
# past the tokenizer. (RoPE variants change only the cos/sin table, which
# test_shape_parity covers; the kernel reads it the same way for all, so
# rope_llama3_hd80 would run here exactly as hd80_mqa does.)
TRITON_SHAPES = ["mqa", "mha", "gqa3", "head_dim_32", "hd80_mqa", "hd96_mha", "hd128", "hd256",
                 "deep_narrow", "inter_100", "qwen3_tied_hd32", "mixtral_top1", "qwen3_moe_top4",
                 "qwen2_moe_top_all", "bf16_mqa_hd80_vocab_1000"]
assert set(TRITON_SHAPES) <= set(SHAPE_VARIANTS)
# Each interpreted run takes seconds: these cover MQA, a group of 3, head
# dims 80 and 32, bf16, a vocabulary past the tokenizer and top-4 experts;
# the rest are marked slow.
FAST = ("mqa", "gqa3", "hd80_mqa", "qwen3_moe_top4", "bf16_mqa_hd80_vocab_1000")
# Shapes whose new ops are the MLP/expert widths, routing or depth, while their
# attention layout is one another run already takes past the decode kernel's
# KV split (qwen3_moe_top4: head_dim_32; mixtral_top1: mqa; qwen2_moe_top_all
# and deep_narrow: the common 2-query-heads-per-KV-head, head_dim 16, of
# test_engine_triton_parity). The interpreter's cost grows with tokens, so
# these skip the 18-token prompt; the 9-token one still prefills in chunks
# beside a decoding sequence.
MLP_ONLY = ("qwen3_moe_top4", "mixtral_top1", "qwen2_moe_top_all", "deep_narrow")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in TRITON_SHAPES])
def test_triton_dispatch_matches_transformers(shape_checkpoints, monkeypatch, name):
    path = shape_checkpoints[name]
    vocab = shape_config(name)["vocab_size"]
    # 9 and 18 tokens: a prefill in several 8-token chunks, then decode steps
    # past 16 cached tokens (the interpreter's KV tile), so the decode kernel
    # splits the context
    prompts = [[5, 9, 13], [7] * 9, [(31 * i) % vocab for i in range(18)]]
    if name in MLP_ONLY:
        prompts = prompts[:2]
    want = hf_greedy(hf_model(path), prompts, 4)
    monkeypatch.setenv("SPLITSERVE_KERNELS", "triton")
    assert dispatch.backend_for(torch.device("cpu")) == "triton"
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=32, block_size=4,
                                 max_num_batched_tokens=8))  # chunked prefill + mixed steps
    got = [r.token_ids for r in eng.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0,
                                                                       ignore_eos=True))]
    assert got == want
    assert eng.kv.all_free()
