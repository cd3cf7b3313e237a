"""config.json parsing of Ministral 3, CWM and IQuest-Coder: the defaults their
transformers config classes fill in (checked against those classes), what is refused
with a clear CheckpointError, tensor parallelism, and Ministral 3's query scaling
against transformers' ``get_llama_4_attn_scale``. Token parity is in
test_model_parity / test_engine_parity (variants ministral3, cwm, iquestcoder) and at
tensor_parallel_size 2 in test_tp_engine."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.models.ministral3 import Ministral3Attention
from splitserve.engine.parallel.plan import check
from tests.fixtures.checkpoints import COMMON, VARIANTS, hf_greedy
from tests.unit.test_family_olmo3_exaone import hf_config, raw
from tests.unit.test_model_parity import ATOL, PROMPT, greedy_tokens, hf_logits, prompt_logits

M3 = "Ministral3ForCausalLM"
WRAPPED = "Mistral3ForConditionalGeneration"


def test_ministral3_defaults_as_transformers_reads_them():
    c = raw(M3, num_hidden_layers=3)
    del c["head_dim"], c["num_key_value_heads"]
    ours, ref = ModelConfig.from_hf(c), hf_config("Ministral3Config", c)
    assert ours.family == "ministral3" and ours.head_dim == ref.head_dim == 128
    assert ours.num_kv_heads == ref.num_key_value_heads == 8 and ours.rms_norm_eps == ref.rms_norm_eps == 1e-5
    assert ours.layer_windows == (0,) * 3 and ref.sliding_window is None and not ours.tie_word_embeddings
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (False, False, False)
    rope = ref.rope_parameters
    assert ours.rope_theta == rope["rope_theta"] == 1e6 and ours.rope_scaling["type"] == rope["rope_type"] == "yarn"
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        assert ours.rope_scaling[key] == rope[key], key
    opts = ours.options
    assert (opts.query_position_beta, opts.query_position_length) == (0.1, 16384) == (
        rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"])
    # a window covers every layer, as Mistral's; head_dim null: the split
    ours = ModelConfig.from_hf(raw(M3, sliding_window=32, head_dim=None))
    assert ours.layer_windows == (32, 32) and ours.head_dim == 16


def test_ministral3_scaling_length_as_transformers_standardises_it():
    rope = {"rope_type": "yarn", "factor": 4.0, "llama_4_scaling_beta": 0.2, "rope_theta": 10.0}
    # a top-level original_max_position_embeddings is not Ministral3Config's: ignored
    for extra, length in [({}, 256), ({"original_max_position_embeddings": 64}, 256),
                          ({"rope_parameters": {**rope, "original_max_position_embeddings": 64}}, 64)]:
        c = raw(M3, **{"rope_parameters": dict(rope), **extra})
        ref = hf_config("Ministral3Config", c).rope_parameters
        ours = ModelConfig.from_hf(c)
        assert ours.options.query_position_length == ref["original_max_position_embeddings"] == length
        assert ours.rope_scaling["original_max_position_embeddings"] == length
    plain = ModelConfig.from_hf(raw(M3, rope_parameters={"rope_type": "default", "rope_theta": 10.0,
                                                         "llama_4_scaling_beta": 0.2,
                                                         "original_max_position_embeddings": 32}))
    assert plain.rope_scaling is None and plain.options.query_position_length == 32


@pytest.mark.parametrize("extra, match", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10.0}}, "needs llama_4_scaling_beta"),
    ({"rope_parameters": {"rope_type": "default", "llama_4_scaling_beta": 0.1}},
     "needs original_max_position_embeddings"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "llama_4_scaling_beta": 0.1,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor 0.5 is not supported"),
    ({"architectures": [WRAPPED], "text_config": {"model_type": "mistral"}},
     "Mistral3ForConditionalGeneration with a text model of model_type 'mistral' is not supported"),
    ({"architectures": [WRAPPED], "text_config": {**raw(M3), "model_type": "ministral3"},
      "quantization_config": {"quant_method": "fp8"}}, "fp8 Mistral3ForConditionalGeneration checkpoints"),
    ({"hidden_act": "relu"}, "activation 'relu' is not supported for ministral3"),
])
def test_ministral3_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf({**raw(M3), **extra})


def test_ministral3_wrapper_reads_its_text_config():
    text = {**raw(M3, eos_token_id=[5, 6], dtype="float32", tie_word_embeddings=False), "model_type": "ministral3"}
    del text["architectures"]
    m = ModelConfig.from_hf({"architectures": [WRAPPED], "model_type": "mistral3", "text_config": text,
                             "vision_config": {"hidden_size": 32}, "dtype": "bfloat16"})
    assert m.architecture == WRAPPED and m.family == "ministral3" and m.hidden_size == 64
    assert m.eos_token_ids == (5, 6) and m.dtype == "float32" and m.options.query_position_beta == 0.1
    assert m.tie_word_embeddings  # the wrapper's tie (default true), as transformers ties it
    del text["dtype"]  # the top level's where the text config has none
    m = ModelConfig.from_hf({"architectures": [WRAPPED], "text_config": text, "dtype": "bfloat16",
                             "tie_word_embeddings": False})
    assert m.dtype == "bfloat16" and not m.tie_word_embeddings


@pytest.mark.parametrize("tied", [True, False])
def test_ministral3_wrapped_checkpoint_serves_its_text_model(tmp_path, tiny_checkpoints, tied):
    # the ministral3 variant's text model inside Mistral3ForConditionalGeneration with a tiny
    # Pixtral tower: language_model.* read, vision_tower.* / multi_modal_projector.* skipped
    import transformers

    _, extra, seed, _ = VARIANTS["ministral3"]
    config = transformers.Mistral3Config(
        text_config=transformers.Ministral3Config(**{**COMMON, "vocab_size": tiny_checkpoints.vocab_size,
                                                     **extra}),
        vision_config=transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=32, patch_size=16,
                                                       head_dim=8),
        tie_word_embeddings=tied)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = transformers.Mistral3ForConditionalGeneration(config).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    ck = load_checkpoint(tmp_path)
    assert ck.model_config.architecture == WRAPPED and ck.model_config.tie_word_embeddings == tied
    model = load_model(ck, torch.float32)
    torch.testing.assert_close(prompt_logits(model), hf_logits(ref, PROMPT), atol=ATOL, rtol=0)
    assert greedy_tokens(model, 6) == hf_greedy(ref, [PROMPT], 6)[0]
    with pytest.raises(CheckpointError, match="LoRA adapters are not supported for Mistral3ForConditional"):
        model.enable_lora(2, 4)


def test_ministral3_query_scale_matches_transformers():
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    cfg = ModelConfig.from_hf(raw(M3, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 5,
                                                       "llama_4_scaling_beta": 0.3}))
    attn = Ministral3Attention(cfg, torch.bfloat16, "cpu")
    positions = torch.arange(40)
    q, k = torch.randn(40, 4, 16).to(torch.bfloat16), torch.randn(40, 2, 16).to(torch.bfloat16)
    ours_q, ours_k = attn.position_qk(positions, q, k, None)
    want = q.transpose(0, 1)[None] * get_llama_4_attn_scale(positions[None], 0.3, 5).to(torch.bfloat16)
    assert torch.equal(ours_q, want[0].transpose(0, 1)) and ours_k is k
    assert torch.equal(ours_q[:5], q[:5]) and not torch.equal(ours_q[5:], q[5:])


def test_cwm_defaults_as_transformers_reads_them():
    c = raw("CwmForCausalLM", num_hidden_layers=6, attention_bias=True)
    del c["head_dim"], c["num_key_value_heads"]
    ours, ref = ModelConfig.from_hf(c), hf_config("CwmConfig", c)
    assert ours.family == "cwm" and ours.head_dim == ref.head_dim == 128
    assert ours.num_kv_heads == ref.num_key_value_heads == 8 and ours.rms_norm_eps == 1e-5
    assert ours.layer_windows == tuple(8192 if t == "sliding_attention" else 0 for t in ref.layer_types)
    assert ours.layer_windows == (0, 8192, 8192, 8192, 0, 8192)
    # attention_bias is not CwmConfig's: no projection takes one
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (False, False, False)
    assert (ours.bos_token_id, ours.eos_token_ids) == (128000, (128001, 128008, 128009))
    rope = ref.rope_parameters
    assert ours.rope_theta == rope["rope_theta"] == 1e6 and ours.rope_scaling["rope_type"] == "llama3"
    assert ours.rope_scaling["original_max_position_embeddings"] == rope["original_max_position_embeddings"]
    ours = ModelConfig.from_hf(raw("CwmForCausalLM", layer_types=["sliding_attention", "full_attention"],
                                   sliding_window=4, mlp_bias=True, rope_parameters={"rope_type": "default"}))
    assert ours.layer_windows == (4, 0) and ours.mlp_bias and ours.rope_scaling is None
    assert ours.rope_theta == 1e6  # CwmConfig's default_theta
    assert ModelConfig.from_hf(raw("CwmForCausalLM", layer_types=["full_attention"] * 2,
                                   sliding_window=None)).layer_windows == (0, 0)


@pytest.mark.parametrize("extra, match", [
    ({"sliding_window": None}, "sliding_window is null but layer_types has sliding_attention"),
    ({"layer_types": ["full_attention"]}, "layer_types has 1 entries for 2 layers"),
    ({"layer_types": ["chunked_attention", "full_attention"]}, "layer_types .* not supported for cwm"),
])
def test_cwm_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw("CwmForCausalLM", **extra))


def test_iquestcoder_defaults_as_transformers_reads_them():
    c = raw("IQuestCoderForCausalLM")
    del c["head_dim"], c["num_key_value_heads"]
    ours, ref = ModelConfig.from_hf(c), hf_config("IQuestCoderConfig", c)
    assert ours.family == "iquestcoder" and ours.head_dim == ref.head_dim == 128
    assert ours.num_kv_heads == ref.num_key_value_heads == 8 and ours.rms_norm_eps == 1e-5
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,)) and ours.layer_windows == (0, 0)
    assert ours.rope_theta == 10000.0 and ours.rope_scaling is None
    ours = ModelConfig.from_hf(raw("IQuestCoderForCausalLM", head_dim=None, num_key_value_heads=None,
                                   attention_bias=True, mlp_bias=True))
    assert ours.head_dim == 16 and ours.num_kv_heads == 4
    assert (ours.attention_bias, ours.o_proj_bias, ours.mlp_bias) == (True, True, True)


@pytest.mark.parametrize("extra, match", [
    ({"clip_qkv": 8.0}, "clip_qkv is not supported for IQuest-Coder"),
    ({"use_sliding_window": True}, "use_sliding_window is not supported for IQuest-Coder"),
    ({"hidden_size": 66}, r"hidden_size \(66\) is not a multiple of num_attention_heads \(4\)"),
])
def test_iquestcoder_unsupported_options_are_refused(extra, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(raw("IQuestCoderForCausalLM", **extra))


@pytest.mark.parametrize("arch", [M3, "CwmForCausalLM", "IQuestCoderForCausalLM"])
def test_tensor_parallel_splits_them(arch):
    check(ModelConfig.from_hf(raw(arch)), 2)  # test_tp_engine checks their tokens at TP=2
