"""Mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE,
GraniteMoE, GraniteMoeShared, GLM-4.5, dots.llm1, PhiMoE, DBRX, gpt-oss,
Llama 4, DeepSeek V2/V3, MiniMax-M2, FlexOlmo, GLM-4.7-Flash...) against
transformers on tiny random checkpoints: 4 experts, top-2 (GLM-4.5,
dots.llm1, DeepSeek and GLM-4.7-Flash: 8 experts in groups; MiniMax-M2: 8
experts, tests/fixtures/checkpoints.py).

Prefill logits match transformers' forward in float32, greedy decoding
through the paged cache reproduces ``generate(do_sample=False)``, and the
engine (batched, chunked prefill) gives transformers' greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.models import MoECausalLM
from splitserve.engine.models.gpt_oss import GptOssMoE
from splitserve.engine.models.moe import SparseMoeBlock, route
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import MOE_VARIANTS, hf_greedy
from tests.unit.test_model_parity import (ATOL, IDENTITY_TABLE, PROMPT, greedy_tokens, hf_logits, new_cache,
                                          prompt_logits, run, step_meta)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_prefill_logits_match_transformers(parity_models, variant):
    model, ref = parity_models(variant)
    assert any(isinstance(m, (SparseMoeBlock, GptOssMoE)) for m in model.modules())
    torch.testing.assert_close(prompt_logits(model), hf_logits(ref, PROMPT), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_greedy_decode_matches_generate(parity_models, variant):
    model, ref = parity_models(variant)
    assert greedy_tokens(model, 8) == hf_greedy(ref, [PROMPT], 8)[0]


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_engine_greedy_matches_transformers(tiny_checkpoints, parity_models, variant):
    _, ref = parity_models(variant)
    prompts = [[5, 9, 13], [7] * 9, list(range(20, 37)), PROMPT]
    want = hf_greedy(ref, prompts, 6)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    # chunks of 8 tokens: prompts split across steps and mixed with decoding ones
    eng = LLMEngine(EngineConfig(model=str(tiny_checkpoints[variant]), num_blocks=64, block_size=4,
                                 max_num_batched_tokens=8))
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
    assert [eng.generate([p], params)[0].token_ids for p in prompts[:2]] == want[:2]
    assert eng.kv.all_free()


def test_engine_on_triton_kernels_matches_transformers(tiny_checkpoints, parity_models, monkeypatch):
    # every op, fused_moe included, through the Triton kernels (interpreted on CPU)
    _, ref = parity_models("mixtral")
    prompts = [[5, 9, 13], list(range(20, 29))]  # the second in two chunks
    want = hf_greedy(ref, prompts, 2)
    monkeypatch.setenv("SPLITSERVE_KERNELS", "triton")
    eng = LLMEngine(EngineConfig(model=str(tiny_checkpoints["mixtral"]), num_blocks=32, block_size=4,
                                 max_num_batched_tokens=8))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
    assert eng.kv.all_free()


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_parity_depends_on_each_familys_normalisation(parity_models, variant):
    # the other family's normalisation moves the logits well past the tolerance
    model, ref = parity_models(variant)
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])
    try:
        for b in blocks:
            b.renormalize = not b.renormalize
        wrong = run(model, new_cache(model), PROMPT, positions, meta)
    finally:
        for b in blocks:
            b.renormalize = not b.renormalize
    assert (wrong - hf_logits(ref, PROMPT)).abs().max() > 100 * ATOL


def test_route():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.5, 0.0]])
    w, ids = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(w, probs.gather(1, ids))
    w, _ = route(logits, 2, renormalize=True)  # = softmax over the two chosen logits
    torch.testing.assert_close(w, torch.softmax(logits.gather(1, ids), -1))


def test_missing_expert_tensor_is_named(tiny_checkpoints):
    from safetensors.torch import load_file

    ck = load_checkpoint(tiny_checkpoints["qwen3_moe"])
    tensors = load_file(str(ck.weight_files[0]))
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    del tensors[gone]
    model = MoECausalLM(ck.model_config, torch.float32, "cpu")
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        model.load_weights(tensors.items())


def _moe_config(arch, **extra):
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_experts_per_tok": 2, **extra}


def test_config_parsing():
    m = ModelConfig.from_hf(_moe_config("MixtralForCausalLM", num_local_experts=8, sliding_window=16,
                                        router_jitter_noise=0.1))
    assert m.family == "mixtral" and not m.attention_bias and not m.qk_norm
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (8, 2, 128)
    assert m.moe.renormalize and m.moe.sparse_layers == (True,) * 4
    assert m.layer_windows == (16,) * 4  # Mixtral, like Mistral, windows every layer
    q3 = ModelConfig.from_hf(_moe_config("Qwen3MoeForCausalLM", num_experts=16, moe_intermediate_size=32,
                                         norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert q3.qk_norm and not q3.attention_bias and q3.moe.shared_expert_intermediate_size == 0
    assert (q3.moe.num_experts, q3.moe.expert_intermediate_size, q3.moe.renormalize) == (16, 32, True)
    assert q3.moe.sparse_layers == (False, True, False, False)  # every 2nd layer, less layer 3
    q2 = ModelConfig.from_hf(_moe_config("Qwen2MoeForCausalLM", num_experts=4, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48))
    assert q2.attention_bias and not q2.qk_norm and not q2.moe.renormalize
    assert q2.moe.shared_expert_intermediate_size == 48
    assert not ModelConfig.from_hf(_moe_config("Qwen2MoeForCausalLM", num_experts=4, qkv_bias=False,
                                               moe_intermediate_size=32)).attention_bias
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        ModelConfig.from_hf(_moe_config("MixtralForCausalLM", num_local_experts=1))
    with pytest.raises(CheckpointError, match="moe_intermediate_size"):
        ModelConfig.from_hf(_moe_config("Qwen3MoeForCausalLM", num_experts=4))
    assert ModelConfig.from_hf(_moe_config("LlamaForCausalLM")).moe is None
