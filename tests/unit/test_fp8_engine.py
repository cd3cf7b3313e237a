"""FP8 weights through the engine, every family, every checkpoint format.

- Parity: an fp8 checkpoint (written as transformers / llm-compressor write
  them: tests/fixtures/fp8_checkpoints.py) runs through LLMEngine and gives
  the greedy tokens of transformers running the same weights dequantized
  to float32, and its prefill logits match that reference's to float32
  rounding: on the CPU each fp8 weight is dequantized exactly (e4m3 times a
  float32 scale is exact in float32) and multiplied in float32.
- Quality: its logits stay within a bounded relative distance of the
  unquantized model's (``LOGIT_REL_BOUND``).
- ``weight_dtype: fp8`` quantizes an unquantized checkpoint at load, per
  channel: the same model as the per-channel compressed-tensors checkpoint
  of the same weights.
"""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.layers import Linear
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.fixtures.fp8_checkpoints import write_dequantized_checkpoint, write_fp8_checkpoint
from tests.unit.test_model_parity import IDENTITY_TABLE, PROMPT, hf_logits, new_cache, run, step_meta

PROMPTS = [[5, 9, 13], [7] * 9, list(range(20, 37)), PROMPT]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
# (source variant, format, options): dense and MoE families, HF fp8 (128-blocks: the
# q/k/v and gate/up scales repeated per row; 32-blocks: kept fused; per-tensor with
# static activation scales), compressed-tensors (per channel, per tensor, blocks)
CASES = [
    ("llama_bf16", "fp8_block", {}),
    ("llama_bias", "fp8_block", {"block": 32}),
    ("qwen2", "fp8_tensor", {"static": True}),
    ("llama_bf16", "ct_channel", {}),
    ("qwen3", "ct_tensor", {"static": True}),
    ("mixtral", "ct_channel", {}),
    ("qwen3_moe", "fp8_block", {"block": 32}),
    ("qwen2_moe", "ct_block", {"block": 32}),
]
# ||logits - unquantized logits|| / ||unquantized logits|| over a prompt. e4m3 keeps 3
# mantissa bits to bfloat16's 7, so its rounding is 16x coarser; rounding these
# models' weights to bfloat16 moves their logits by 0.011 (llama), hence ~0.18 for
# fp8. Measured 0.10-0.17 across the cases below (these random, wide-weight models
# amplify weight noise far more than trained ones).
LOGIT_REL_BOUND = 0.25


def case_id(case) -> str:
    variant, fmt, opts = case
    return "-".join([variant, fmt, *(f"{k}{v}" for k, v in opts.items())])


@pytest.fixture(scope="module")
def fp8_pair(tiny_checkpoints, tmp_path_factory):
    """(variant, fmt, opts) -> (fp8 checkpoint, its float32 dequantized twin)."""
    cache = {}

    def get(variant, fmt, opts):
        key = case_id((variant, fmt, opts))
        if key not in cache:
            root = tmp_path_factory.mktemp(key)
            q = write_fp8_checkpoint(tiny_checkpoints[variant], root / "fp8", fmt, **opts)
            cache[key] = (q, write_dequantized_checkpoint(q, root / "dequantized"))
        return cache[key]

    return get


def fp8_linears(model) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m.weight_scale is not None]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_engine_greedy_matches_dequantized_reference(fp8_pair, case):
    q, deq = fp8_pair(*case)
    want = hf_greedy(hf_model(deq), PROMPTS, GREEDY.max_tokens)
    # chunks of 8 tokens: prompts split across steps and batched with decoding ones
    eng = LLMEngine(EngineConfig(model=str(q), num_blocks=64, block_size=4, max_num_batched_tokens=8))
    assert [r.token_ids for r in eng.generate(PROMPTS, GREEDY)] == want
    assert eng.kv.all_free()
    model = eng.runner.model
    # every decoder projection is fp8 (4 per layer: qkv, o, gate_up, down; MoE
    # layers' experts instead of gate_up/down); routers, embeddings stay float
    assert all(lin.weight.dtype == torch.float8_e4m3fn for lin in fp8_linears(model))
    layers = model.cfg.num_layers
    moe = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    assert len(fp8_linears(model)) == 4 * layers - 2 * len(moe) + 2 * sum(
        m.shared_expert is not None for m in moe)
    assert all(m.w_gate_up.dtype == m.w_down.dtype == torch.float8_e4m3fn for m in moe)
    assert all(m.gate.weight_scale is None for m in moe)
    assert model.embed_tokens.dtype == torch.float32


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_logits_match_reference_and_stay_near_unquantized(fp8_pair, tiny_checkpoints, case):
    variant = case[0]
    q, deq = fp8_pair(*case)
    model = load_model(load_checkpoint(q), torch.float32)
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    logits = run(model, new_cache(model), PROMPT, positions, meta)
    # the same weights dequantized, in transformers: float32 rounding apart
    torch.testing.assert_close(logits, hf_logits(hf_model(deq), PROMPT), atol=1e-4, rtol=0)
    full = load_model(load_checkpoint(tiny_checkpoints[variant]), torch.float32)
    ref = run(full, new_cache(full), PROMPT, positions, meta)
    rel = ((logits - ref).norm() / ref.norm()).item()
    assert 0 < rel < LOGIT_REL_BOUND, rel


def test_weight_dtype_fp8_quantizes_at_load_like_a_per_channel_checkpoint(fp8_pair, tiny_checkpoints):
    src = tiny_checkpoints["llama"]  # float32: a per-channel checkpoint's scales are exact
    ct, _ = fp8_pair("llama", "ct_channel", {})
    args = dict(num_blocks=64, block_size=4, max_num_batched_tokens=8)
    on_load = LLMEngine(EngineConfig(model=str(src), weight_dtype="fp8", **args))
    stored = LLMEngine(EngineConfig(model=str(ct), **args))
    a, b = on_load.runner.model, stored.runner.model
    assert len(fp8_linears(a)) == 4 * a.cfg.num_layers
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pa.dtype == pb.dtype and torch.equal(pa.float(), pb.float()), name
    assert ([r.token_ids for r in on_load.generate(PROMPTS, GREEDY)]
            == [r.token_ids for r in stored.generate(PROMPTS, GREEDY)])
    # load_model's own switch gives the same model
    direct = load_model(load_checkpoint(src), torch.float32, weight_dtype="fp8")
    assert all(torch.equal(x.float(), y.float()) for x, y in zip(direct.parameters(), a.parameters()))


def test_weight_dtype_fp8_quantizes_moe_experts(tiny_checkpoints):
    model = load_model(load_checkpoint(tiny_checkpoints["qwen2_moe"]), torch.float32, weight_dtype="fp8")
    full = load_model(load_checkpoint(tiny_checkpoints["qwen2_moe"]), torch.float32)
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(b.w_gate_up.dtype == torch.float8_e4m3fn and b.gate_up_groups[0] == 1
                          and b.shared_expert.down_proj.weight.dtype == torch.float8_e4m3fn
                          and b.gate.weight.dtype == torch.float32
                          and b.shared_expert_gate.weight.dtype == torch.float32 for b in blocks)
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    logits = run(model, new_cache(model), PROMPT, positions, meta)
    ref = run(full, new_cache(full), PROMPT, positions, meta)
    assert 0 < ((logits - ref).norm() / ref.norm()).item() < LOGIT_REL_BOUND


def test_fp8_engine_on_triton_kernels_matches_reference(fp8_pair, monkeypatch):
    # every op through the Triton kernels (interpreted on CPU): the fp8 GEMM
    # decoding weights in the kernel, with 32x32 block scales kept fused
    q, deq = fp8_pair("qwen3_moe", "fp8_block", {"block": 32})
    prompts = [[5, 9, 13], list(range(20, 29))]  # the second in two chunks
    want = hf_greedy(hf_model(deq), prompts, 2)
    monkeypatch.setenv("SPLITSERVE_KERNELS", "triton")
    eng = LLMEngine(EngineConfig(model=str(q), num_blocks=32, block_size=4, max_num_batched_tokens=8))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, params)] == want


def test_fp8_activations_path(fp8_pair, tiny_checkpoints):
    # what GPUs with FP8 tensor cores run (activations quantized per token), here
    # through the torch reference: a little further from the unquantized logits
    q, _ = fp8_pair("llama_bf16", "ct_channel", {})
    model = load_model(load_checkpoint(q), torch.float32)
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    w8a16 = run(model, new_cache(model), PROMPT, positions, meta)
    for lin in fp8_linears(model):
        lin.fp8_activations = True
    w8a8 = run(model, new_cache(model), PROMPT, positions, meta)
    full = load_model(load_checkpoint(tiny_checkpoints["llama_bf16"]), torch.float32)
    ref = run(full, new_cache(full), PROMPT, positions, meta)
    assert 0 < ((w8a8 - w8a16).norm() / ref.norm()).item() < LOGIT_REL_BOUND
    assert ((w8a8 - ref).norm() / ref.norm()).item() < LOGIT_REL_BOUND
