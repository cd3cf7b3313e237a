"""Token parity with transformers for model shapes the family tests do not
cover (tests.fixtures.shape_variants): prefill logits against transformers
in float32, and greedy generation through the engine with a paged cache,
chunked prefill, prefix-cache hits and a KV hand-off into a second engine."""

import json
import random

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import CheckpointError, InvalidRequestError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.fixtures.handoff import handoff_generate
from tests.fixtures.shape_variants import SHAPE_VARIANTS, shape_config

MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
SHAPES = list(SHAPE_VARIANTS)


def prompts_for(name: str) -> list[list[int]]:
    """Prompts over the model's whole vocabulary (past the tokenizer's ids
    where the model has more), short and long enough to span several blocks
    and chunks; the longest still fits the shortest context."""
    vocab = shape_config(name)["vocab_size"]
    rng = random.Random(7)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (1, 5, 13, 22)]


def engine(path, **kw) -> LLMEngine:
    args = dict(model=str(path), num_blocks=64, block_size=4, max_num_batched_tokens=7,
                max_num_seqs=4, enable_prefix_caching=True)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


@pytest.fixture(scope="module", params=SHAPES)
def shape(request, shape_checkpoints):
    path = shape_checkpoints[request.param]
    model = hf_model(path)
    prompts = prompts_for(request.param)
    return request.param, path, model, prompts, hf_greedy(model, prompts, MAX_NEW)


def prompt_logits(eng, model, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's logits after one prefill step of ``prompt`` (request
    "x", left for the caller to abort), and transformers' last-row logits."""
    eng.add_request("x", prompt_token_ids=prompt, params=SamplingParams(max_tokens=1, temperature=0.0))
    sched = eng.scheduler.schedule()
    logits, _, _ = eng.runner.execute(sched.scheduled, eng.kv)
    eng.scheduler.commit(sched)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1].float()
    return logits, ref


def test_prefill_logits_match_transformers(shape):
    _, path, model, prompts, _ = shape
    eng = engine(path, max_num_batched_tokens=64)  # one step per prompt: every row's logits
    for p in prompts:
        logits, ref = prompt_logits(eng, model, p)
        assert logits.shape[-1] == model.config.vocab_size
        torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)
        eng.abort("x")
    assert eng.kv.all_free()


def test_greedy_generate_matches_transformers(shape):
    """Chunked prefill (7-token steps) over 4-token blocks, batched; then the
    same prompts again, now hitting the prefix cache."""
    _, path, _, prompts, want = shape
    eng = engine(path)
    got = [r.token_ids for r in eng.generate(prompts, GREEDY)]
    assert got == want
    hits = eng.kv.pool.hits
    again = [r.token_ids for r in eng.generate(prompts, GREEDY)]
    assert again == want
    assert eng.kv.pool.hits > hits
    eng.kv.check_invariants()
    assert eng.kv.all_free()


def test_kv_handoff_keeps_parity(shape):
    """Prefill on one engine, KV exported and imported into another, decode there."""
    _, path, _, prompts, want = shape
    src, dst = engine(path), engine(path, max_num_batched_tokens=64)
    assert handoff_generate(src, dst, prompts, GREEDY) == want
    assert src.kv.all_free() and dst.kv.all_free()


def test_context_shorter_than_requested_max_model_len(shape_checkpoints, caplog):
    """max_position_embeddings 40: an engine asked for 1000 tokens of context
    serves 40 (the RoPE table's rows), refuses what cannot fit, and stops
    an open-ended generation at the 40th token with transformers' tokens."""
    path = shape_checkpoints["short_context"]
    assert shape_config("short_context")["max_position_embeddings"] == 40
    with caplog.at_level("WARNING", logger="splitserve.engine"):
        eng = engine(path, max_model_len=1000)
    assert eng.max_model_len == 40
    assert "max_model_len 1000 is past the model's max_position_embeddings 40" in caplog.text
    prompt = prompts_for("short_context")[-1] + [3] * 8  # 30 tokens
    out = eng.generate([prompt], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf_model(path), [prompt], 10)[0]
    assert out.finish_reason == "length"
    with pytest.raises(InvalidRequestError) as e:
        eng.validate(prompt, SamplingParams(max_tokens=11))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="context is 40 tokens"):
        eng.validate([5] * 40, SamplingParams(max_tokens=1))
    assert eng.kv.all_free()


def test_fp8_kv_cache_at_head_dim_80(shape_checkpoints):
    """An fp8 KV cache with single-KV-head, head_dim 80 attention tracks the
    float32 cache as closely as at the common shape (test_fp8_kv_engine: the
    tiny random models' close logits flip a few greedy first tokens), and
    moves through a hand-off between two fp8 engines without changing a token."""
    path = shape_checkpoints["hd80_mqa"]
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(rng.randrange(5, 40))] for _ in range(20)]
    sp = SamplingParams(max_tokens=3, temperature=0.0, logprobs=5, ignore_eos=True)
    full = engine(path).generate(prompts, sp)
    src, dst = (engine(path, kv_cache_dtype="fp8", num_blocks=256) for _ in range(2))
    assert src.runner.kv_cache.dtype == torch.float8_e4m3fn
    fp8 = src.generate(prompts, sp)
    assert sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(full, fp8)) >= 17
    assert max(abs(a.logprobs[0].logprob - b.logprobs[0].logprob) for a, b in zip(full, fp8)) < 0.3
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert handoff_generate(src, dst, prompts, greedy) == [r.token_ids for r in fp8]
    assert src.kv.all_free() and dst.kv.all_free()


def with_config(src, out, edit) -> str:
    """A checkpoint folder with ``src``'s files (linked) and its config.json
    changed by ``edit(config)``."""
    out.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _legacy_rope(scaling: dict, top_level: dict):
    def edit(cfg):
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params["rope_theta"]
        cfg["rope_scaling"] = scaling
        cfg.update(top_level)
    return edit


# transformers-4 layouts whose pretraining length is not in the scaling dict:
# transformers takes a top-level original_max_position_embeddings (Phi-3
# style, which wins over the dict's) or else max_position_embeddings
LEGACY_ROPE = {
    "yarn_from_max_position": ("rope_yarn", {"type": "yarn", "factor": 4.0}, {}),
    "yarn_top_level_original": ("rope_yarn", {"type": "yarn", "factor": 4.0},
                                {"original_max_position_embeddings": 64}),
    "yarn_top_level_wins": ("rope_yarn", {"type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 128},
                            {"original_max_position_embeddings": 32}),
    "llama3_from_max_position": ("rope_llama3_hd80", {"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0},
                                 {"rope_theta": 500000.0}),
}


@pytest.mark.parametrize("case", LEGACY_ROPE)
def test_rope_pretraining_length_found_where_transformers_finds_it(shape_checkpoints, tmp_path, case):
    shape, scaling, top = LEGACY_ROPE[case]
    path = with_config(shape_checkpoints[shape], tmp_path / case, _legacy_rope(scaling, top))
    model = hf_model(path)
    prompt = prompts_for(shape)[-1]
    eng = engine(path, max_num_batched_tokens=64)
    eng.add_request("x", prompt_token_ids=prompt, params=SamplingParams(max_tokens=1, temperature=0.0))
    sched = eng.scheduler.schedule()
    logits, _, _ = eng.runner.execute(sched.scheduled, eng.kv)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1].float()
    torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)


def test_bf16_compute_and_handoff_at_head_dim_80(shape_checkpoints):
    """bf16 weights, activations and KV cache (one KV head of head_dim 80,
    vocabulary past the tokenizer): logits within bf16 rounding of
    transformers' float32, and the hand-off of a bf16 cache changes no token."""
    name = "bf16_mqa_hd80_vocab_1000"
    path = shape_checkpoints[name]
    prompts = prompts_for(name)
    model = hf_model(path)
    eng = engine(path, dtype="bfloat16", max_num_batched_tokens=64)
    assert eng.runner.kv_cache.dtype == torch.bfloat16
    for p in prompts:
        logits, ref = prompt_logits(eng, model, p)
        torch.testing.assert_close(logits[0], ref, atol=0.3, rtol=0)
        eng.abort("x")
    alone = [r.token_ids for r in eng.generate(prompts, GREEDY)]
    src, dst = (engine(path, dtype="bfloat16", max_num_batched_tokens=64) for _ in range(2))
    assert handoff_generate(src, dst, prompts, GREEDY) == alone
    assert src.kv.all_free() and dst.kv.all_free()


@pytest.mark.parametrize("layout", ["top_level", "rope_parameters"])
def test_partial_rotary_is_refused_at_load(shape_checkpoints, tmp_path, layout):
    """Rotary over part of each head is not implemented: a clear error at
    load, whichever layout the config writes it in, never a full rotation."""
    def edit(cfg):
        if layout == "top_level":
            cfg["partial_rotary_factor"] = 0.5
        else:
            cfg["rope_parameters"]["partial_rotary_factor"] = 0.5
    path = with_config(shape_checkpoints["mqa"], tmp_path / layout, edit)
    with pytest.raises(CheckpointError, match="partial_rotary_factor != 1 is not supported"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["hd80_mqa", "inter_100", "qwen3_tied_hd32"])
def test_lora_on_unusual_shapes_matches_peft(shape_checkpoints, tmp_path, name):
    """A PEFT adapter on every projection of a model with one KV head of
    head_dim 80, an MLP 100 wide, or Qwen3 q/k norms over head_dim 32 with
    tied embeddings: greedy tokens equal PEFT's, also across a hand-off."""
    pytest.importorskip("peft")
    from tests.fixtures.lora_adapters import build_adapter, peft_model

    base = shape_checkpoints[name]
    adapter = build_adapter(base, tmp_path / "adapter", seed=5, r=4, target_modules="all-linear")
    prompts = prompts_for(name)
    want = hf_greedy(peft_model(base, adapter), prompts, MAX_NEW)
    src, dst = (engine(base, max_loras=1, max_lora_rank=8, num_blocks=128) for _ in range(2))
    ref = src.add_adapter("a", str(adapter))
    assert [r.token_ids for r in src.generate(prompts, GREEDY, adapters=["a"] * len(prompts))] == want
    assert handoff_generate(src, dst, prompts, GREEDY, adapters=[ref] * len(prompts)) == want
    assert src.kv.all_free() and dst.kv.all_free()


def test_rope_theta_in_rope_parameters_wins_over_top_level(shape_checkpoints, tmp_path):
    """A config carrying both (a top-level rope_theta added to a transformers-5
    config): transformers uses rope_parameters' value, and so must we."""
    def edit(cfg):
        cfg["rope_theta"] = 100.0
    path = with_config(shape_checkpoints["rope_theta_1e6"], tmp_path / "both", edit)
    assert load_checkpoint(path).model_config.rope_theta == 1e6
    model = hf_model(path)
    prompt = prompts_for("rope_theta_1e6")[-1]
    eng = engine(path, max_num_batched_tokens=64)
    eng.add_request("x", prompt_token_ids=prompt, params=SamplingParams(max_tokens=1, temperature=0.0))
    sched = eng.scheduler.schedule()
    logits, _, _ = eng.runner.execute(sched.scheduled, eng.kv)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1].float()
    torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)


def test_odd_head_dim_is_refused_at_load(shape_checkpoints, tmp_path):
    """Rotate-half RoPE needs an even head_dim (transformers cannot run an odd
    one either): refused when the checkpoint is opened, not on each request."""
    def edit(cfg):
        cfg["head_dim"] = 15
    path = with_config(shape_checkpoints["mqa"], tmp_path / "odd", edit)
    with pytest.raises(CheckpointError, match="rotary embeddings need an even head_dim; it is 15"):
        load_checkpoint(path)
