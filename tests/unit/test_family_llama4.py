"""Llama 4 (llama4): config.json defaults and the options read (the text tower of
``Llama4ForConditionalGeneration`` too), what is refused, the context capped at
the attention chunk size, that the q/k L2 norm, the query temperature and the
experts' input scaling each move the logits, and a ``Llama4ForConditionalGeneration``
checkpoint's text part against transformers. Token parity of the ``llama4``
variant is in test_moe_parity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.errors import CheckpointError, InvalidRequestError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models import build_model
from splitserve.engine.models.llama4 import Llama4Attention, Llama4MoeBlock
from splitserve.engine.parallel.plan import check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import COMMON, VARIANTS, hf_greedy
from tests.unit.test_model_parity import (ATOL, IDENTITY_TABLE, PROMPT, greedy_tokens, hf_logits, new_cache,
                                          prompt_logits, run, step_meta)

TEXT = "Llama4ForCausalLM"
WRAPPED = "Llama4ForConditionalGeneration"


def raw(arch: str = TEXT, **extra) -> dict:
    return {"architectures": [arch], "vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, **extra}


def test_defaults_as_transformers_reads_them():
    m = ModelConfig.from_hf(raw())
    assert m.family == "llama4" and m.head_dim == 128 and m.num_kv_heads == 8 and m.rms_norm_eps == 1e-5
    assert m.max_position == 8192 and m.rope_theta == 500000.0 and m.rope_scaling is None
    assert m.intermediate_size == 16384 and m.moe.sparse_layers == (True,) * 4
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (16, 1, 8192)
    assert m.moe.shared_expert_intermediate_size == 8192 and m.layer_windows == (0,) * 4
    assert not (m.attention_bias or m.o_proj_bias or m.mlp_bias or m.qk_norm or m.tie_word_embeddings)
    o = m.options
    assert o.nope_layers == (3,) and o.rope_qk_l2_norm and o.interleaved_rope
    assert (o.temperature_floor, o.temperature_scale, o.hidden_act) == (8192.0, 0.1, "silu")
    assert (m.bos_token_id, m.eos_token_ids) == (1, (2,))


def test_options_read():
    m = ModelConfig.from_hf(raw(
        head_dim=16, num_key_value_heads=2, intermediate_size=32, intermediate_size_mlp=48,
        num_local_experts=8, num_experts_per_tok=2, interleave_moe_layer_step=2, no_rope_layers=[0, 1, 1, 0],
        use_qk_norm=False, attn_temperature_tuning=False, attention_bias=True, attention_chunk_size=None,
        max_position_embeddings=1024, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0}))
    assert m.moe.sparse_layers == (False, True, False, True) and m.intermediate_size == 48
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (8, 2, 32)
    assert m.options.nope_layers == (0, 3) and not m.options.rope_qk_l2_norm
    assert m.options.temperature_floor == 0.0 and m.attention_bias and m.o_proj_bias
    # no chunk: no cap; llama3's pretraining length from the (uncapped) max_position_embeddings
    assert m.max_position == 1024 and m.rope_scaling["original_max_position_embeddings"] == 1024
    assert ModelConfig.from_hf(raw(moe_layers=[2])).moe.sparse_layers == (False, False, True, False)
    assert ModelConfig.from_hf(raw(no_rope_layers=[])).options.nope_layers == (3,)  # empty: the default
    # the cap: only while some layer attends in chunks, at most max_position_embeddings
    assert ModelConfig.from_hf(raw(layer_types=["full_attention"] * 4)).max_position == 131072
    assert ModelConfig.from_hf(raw(attention_chunk_size=100, max_position_embeddings=64)).max_position == 64
    assert ModelConfig.from_hf(raw(attention_chunk_size=100)).max_position == 100


def test_conditional_generation_reads_its_text_config():
    text = raw(head_dim=16, num_key_value_heads=2, eos_token_id=[5, 6], tie_word_embeddings=True,
               dtype="float32")
    del text["architectures"]
    m = ModelConfig.from_hf({"architectures": [WRAPPED], "model_type": "llama4", "text_config": text,
                             "vision_config": {"hidden_size": 32}, "dtype": "bfloat16",
                             "tie_word_embeddings": False})
    assert m.architecture == WRAPPED and m.family == "llama4" and m.hidden_size == 64
    assert m.eos_token_ids == (5, 6) and m.tie_word_embeddings and m.dtype == "float32"
    del text["dtype"]  # the top level's where the text config has none
    assert ModelConfig.from_hf({"architectures": [WRAPPED], "text_config": text,
                                "dtype": "bfloat16"}).dtype == "bfloat16"


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for llama4"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported for llama4"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported for llama4"),
    ({"layer_types": ["sliding_attention"] * 4}, r"layer_types \['sliding_attention'\] are not supported"),
    ({"layer_types": ["chunked_attention"] * 4, "attention_chunk_size": None},
     "attention_chunk_size is null but layer_types has chunked_attention"),
    ({"attention_chunk_size": 0}, "attention_chunk_size must be positive"),
    ({"interleave_moe_layer_step": 0}, "interleave_moe_layer_step must be positive"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8 Llama 4 checkpoints are not supported"),
])
def test_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw(**extra))


def test_fp8_wrapped_checkpoint_refused_tensor_parallel_allowed(parity_models):
    text = {k: v for k, v in raw().items() if k != "architectures"}
    with pytest.raises(CheckpointError, match="fp8 Llama 4 checkpoints"):
        ModelConfig.from_hf({"architectures": [WRAPPED], "text_config": text,
                             "quantization_config": {"quant_method": "fp8"}})
    model, _ = parity_models("llama4")
    check(model.cfg, 2)
    # LoRA on its attention (test_lora_engine), but not through the wrapper's module names
    assert {name for _, name in model.enable_lora(1, 4)} >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    wrapped = build_model(dataclasses.replace(model.cfg, architecture=WRAPPED), torch.float32, "meta")
    with pytest.raises(CheckpointError, match="serve its text model as Llama4ForCausalLM"):
        wrapped.enable_lora(2, 4)


def test_context_is_capped_at_the_chunk_size(tiny_checkpoints, parity_models):
    # the variant's chunks of 64 tokens: a 56-token prompt and 8 new tokens fill the context
    # exactly as transformers (its chunked layers attending within the first chunk) does
    _, ref = parity_models("llama4")
    eng = LLMEngine(EngineConfig(model=str(tiny_checkpoints["llama4"]), num_blocks=64, block_size=4,
                                 max_num_batched_tokens=24))
    assert eng.max_model_len == 64
    prompt = [(13 * i + 7) % 500 for i in range(56)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    assert eng.generate([prompt], params)[0].token_ids == hf_greedy(ref, [prompt], 8)[0]
    with pytest.raises(InvalidRequestError, match="context of 64 tokens"):
        eng.generate([prompt], SamplingParams(max_tokens=9, temperature=0.0))


def test_l2_norm_temperature_and_input_scaling_bind(parity_models, monkeypatch):
    # each undone moves the variant's logits well past the tolerance
    model, ref = parity_models("llama4")
    rope_attn, nope_attn = (layer.self_attn for layer in model.layers)
    assert isinstance(rope_attn, Llama4Attention) and isinstance(model.layers[1].mlp, Llama4MoeBlock)
    assert rope_attn.l2_eps is not None and model.rope_table(1) is None
    want = hf_logits(ref, PROMPT)
    positions, meta = step_meta([IDENTITY_TABLE], [0], [len(PROMPT)])

    def output_weighted(block, x):  # the usual MoE: scores weight the experts' outputs
        top, ids = torch.topk(block.gate(x), block.top_k, dim=-1)
        return block.shared_expert(x) + block.run_experts(x, torch.sigmoid(top), ids)

    for undo in ("l2_norm", "temperature", "input_scaling"):
        with monkeypatch.context() as m:
            if undo == "l2_norm":
                m.setattr(rope_attn, "l2_eps", None)
            elif undo == "temperature":
                m.setattr(nope_attn, "temperature_floor", 0.0)
            else:
                m.setattr(Llama4MoeBlock, "forward", output_weighted)
            wrong = run(model, new_cache(model), PROMPT, positions, meta)
        assert (wrong - want).abs().max() > 100 * ATOL, undo


def test_conditional_generation_checkpoint_serves_its_text_model(tmp_path, tiny_checkpoints):
    # the llama4 variant's text model inside Llama4ForConditionalGeneration with a tiny vision
    # tower: language_model.* read, vision_model.* / multi_modal_projector.* skipped
    import transformers

    _, extra, _, _ = VARIANTS["llama4"]
    config = transformers.Llama4Config(
        text_config={**COMMON, "vocab_size": tiny_checkpoints.vocab_size, **extra},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64, "vision_output_dim": 32, "image_size": 28,
                       "projector_input_dim": 32, "projector_output_dim": 32})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(161)
        ref = transformers.Llama4ForConditionalGeneration(config).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    ck = load_checkpoint(tmp_path)
    assert ck.model_config.architecture == WRAPPED and ck.model_config.max_position == 64
    model = load_model(ck, torch.float32)
    torch.testing.assert_close(prompt_logits(model), hf_logits(ref, PROMPT), atol=ATOL, rtol=0)
    assert greedy_tokens(model, 6) == hf_greedy(ref, [PROMPT], 6)[0]
