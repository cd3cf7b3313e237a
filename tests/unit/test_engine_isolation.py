"""A request that makes the engine raise fails alone: the model forward
(an out-of-vocabulary token id reaching the embedding: a real IndexError),
sampling, output processing and prompt logprobs; the other requests of the
same batches finish with their reference tokens and every block is freed.
A broken engine (device error, failures everywhere) stops instead."""

import pytest
import torch

from splitserve.engine.errors import EngineDeadError, RequestFailedError
from splitserve.engine.isolation import is_fatal, split_failures
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.pd_harness import make_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7, 8, 9], "b": [11, 3, 40, 2], "c": [100, 101, 102, 103, 104, 105, 106],
           "d": [17, 18]}


@pytest.fixture(scope="module")
def reference(tiny_llama):
    eng = make_engine(tiny_llama)
    return {rid: r.token_ids for rid, r in zip(PROMPTS, eng.generate(PROMPTS.values(), GREEDY))}


def add_all(eng, params=GREEDY):
    for rid, p in PROMPTS.items():
        eng.add_request(rid, prompt_token_ids=p, params=params)


def add_unchecked(eng, rid, prompt, params=GREEDY):
    """Admit a request past validation (as a bug upstream would)."""
    st = eng.new_request_state(rid, prompt, params, None)
    eng.requests[rid] = st
    eng.scheduler.add(st.seq)


def run(eng, before_step=None):
    """Step to the end; returns (tokens per request, error per failed request)."""
    toks, errors = {}, {}
    while eng.has_unfinished():
        if before_step:
            before_step(eng)
        for out in eng.step():
            toks.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.error is not None:
                assert out.finished and not out.new_token_ids
                errors[out.request_id] = out.error
    return toks, errors


def assert_clean(eng):
    eng.kv.check_invariants()
    assert eng.kv.all_free() and not eng.requests and not eng.has_unfinished()


def test_a_prompt_the_model_cannot_embed_fails_alone(tiny_llama, reference):
    eng = make_engine(tiny_llama)
    add_all(eng)
    add_unchecked(eng, "poison", [5, 6, eng.model_cfg.vocab_size + 7])  # IndexError in F.embedding
    toks, errors = run(eng)
    assert {r: toks[r] for r in PROMPTS} == reference
    assert list(errors) == ["poison"] and toks.get("poison", []) == []
    err = errors["poison"]
    assert isinstance(err, RequestFailedError) and err.request_id == "poison"
    assert "the model forward" in str(err) and "IndexError" in str(err)
    assert eng.num_failed_requests == 1 and eng.failures_in_a_row == 0
    assert_clean(eng)


def test_a_sequence_that_breaks_mid_decode_fails_alone(tiny_llama, reference):
    """After three tokens the poison's last token turns out of vocabulary:
    its next decode step raises in a batch with the others."""
    eng = make_engine(tiny_llama)
    add_all(eng)
    eng.add_request("poison", prompt_token_ids=[9, 8, 7], params=GREEDY)
    forwards = []
    execute = eng.runner.execute

    def counting(scheduled, kv, on_layer_done=None):
        forwards.append(len(scheduled))
        return execute(scheduled, kv, on_layer_done)

    eng.runner.execute = counting

    def corrupt(e):
        seq = e.requests["poison"].seq if "poison" in e.requests else None
        if seq is not None and seq.num_output_tokens == 3 and seq.token_ids[-1] < 10_000:
            seq.token_ids[-1] = 10_000 + e.model_cfg.vocab_size
    toks, errors = run(eng, corrupt)
    assert {r: toks[r] for r in PROMPTS} == reference
    assert len(toks["poison"]) == 3 and isinstance(errors["poison"], RequestFailedError)
    # the failed batch of 5 ran as halves until the poison was alone:
    # [5] fails, [2] runs, [3] fails, [1] runs, [2] fails, [1] runs, [1] fails
    assert forwards[:11] == [5, 5, 5, 5, 2, 3, 1, 2, 1, 1, 4]
    assert_clean(eng)


def test_sampling_that_raises_for_one_request_fails_it_alone(tiny_llama, reference):
    eng = make_engine(tiny_llama)
    add_all(eng)
    sp = SamplingParams(max_tokens=12, temperature=0.7, seed=3, logit_bias={4: 1.0})
    eng.add_request("poison", prompt_token_ids=[9, 8, 7], params=sp)
    # a bias table the sampler cannot turn into tensors
    eng.requests["poison"].sampling.params = SamplingParams(
        max_tokens=12, temperature=0.7, seed=3, logit_bias={"four": 1.0})
    toks, errors = run(eng)
    assert {r: toks[r] for r in PROMPTS} == reference
    assert "sampling" in str(errors["poison"]) and toks.get("poison", []) == []
    assert_clean(eng)


def test_output_processing_that_raises_fails_alone(tiny_llama, reference):
    """The detokenizer of one request raises on its fourth token."""
    eng = make_engine(tiny_llama)
    add_all(eng)
    eng.add_request("poison", prompt_token_ids=[9, 8, 7], params=GREEDY)
    detok = eng.requests["poison"].detok
    step = detok.step

    def breaking(ids):
        if len(detok.ids) >= 3 + 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return step(ids)
    detok.step = breaking
    toks, errors = run(eng)
    assert {r: toks[r] for r in PROMPTS} == reference
    assert len(toks["poison"]) == 3 and "output processing" in str(errors["poison"])
    assert_clean(eng)


def test_a_prefill_only_request_that_raises_frees_its_blocks(tiny_llama):
    eng = make_engine(tiny_llama)
    eng.add_request("held", prompt_token_ids=[5, 6, 7, 8, 9], params=GREEDY, prefill_only=True)
    st = eng.new_request_state("poison", [1, 2, eng.model_cfg.vocab_size], GREEDY, None)
    eng.requests["poison"] = st
    eng._prefill_only.add("poison")
    eng.scheduler.add(st.seq)
    outs = {o.request_id: o for o in eng.step()}
    assert outs["held"].finish_reason == "handoff" and outs["poison"].error is not None
    assert "poison" not in eng._prefill_only and "poison" not in eng.requests
    eng.kv.check_invariants()
    eng.kv_port.release("held")
    assert_clean(eng)


def test_a_device_error_stops_the_engine_at_once(tiny_llama):
    eng = make_engine(tiny_llama)
    add_all(eng)
    execute = eng.runner.execute
    tries = []

    def device_lost(scheduled, kv, on_layer_done=None):
        tries.append(len(scheduled))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    eng.runner.execute = device_lost
    with pytest.raises(RuntimeError, match="CUDA error"):
        eng.step()
    assert tries == [4]  # no retry on a broken device
    eng.runner.execute = execute


def test_a_model_that_fails_everything_and_the_probe_stops_the_engine(tiny_llama):
    eng = make_engine(tiny_llama)
    add_all(eng)

    def broken(scheduled, kv, on_layer_done=None):
        raise ValueError("weights went missing")
    eng.runner.execute = broken
    with pytest.raises(EngineDeadError, match="one-token probe"):
        eng.step()


def test_failures_with_no_progress_in_between_stop_the_engine(tiny_llama):
    eng = make_engine(tiny_llama)
    eng.max_consecutive_failures = 3
    bad = eng.model_cfg.vocab_size
    for i in range(2):  # each fails alone; the probe passes
        add_unchecked(eng, f"p{i}", [5, bad])
        (out,) = eng.step()
        assert out.error is not None and eng.failures_in_a_row == i + 1
    eng.add_request("ok", prompt_token_ids=[5, 6], params=SamplingParams(max_tokens=1))
    assert eng.step()[0].finish_reason == "length" and eng.failures_in_a_row == 0
    for i in range(3):
        add_unchecked(eng, f"q{i}", [5, bad])
    with pytest.raises(EngineDeadError, match="3 requests failed in a row"):
        eng.step()


def test_split_failures_finds_every_culprit_and_runs_the_rest():
    runs = []

    def run(part):
        runs.append(part)
        bad = [x for x in part if x in (3, 7)]
        if bad:
            raise KeyError(bad[0])
        return sum(part)
    items = list(range(10))
    ran, failed = split_failures(items, run, KeyError(3))
    assert [(x, type(e)) for x, e in failed] == [(3, KeyError), (7, KeyError)]
    assert sorted(x for part, _ in ran for x in part) == [0, 1, 2, 4, 5, 6, 8, 9]
    assert all(r == sum(p) for p, r in ran)
    # halving down to the culprits: 12 runs for 2 among 10 (about 2k log2 n)
    assert runs == [[0, 1, 2, 3, 4], [0, 1], [2, 3, 4], [2], [3, 4], [3], [4],
                    [5, 6, 7, 8, 9], [5, 6], [7, 8, 9], [7], [8, 9]]
    # a batch that failed for its size alone runs as two halves
    ran, failed = split_failures([1, 2], lambda p: len(p), MemoryError())
    assert failed == [] and [p for p, _ in ran] == [[1], [2]]


def test_fatal_errors():
    assert is_fatal(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_fatal(RuntimeError("shape mismatch"))
    assert not is_fatal(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(RuntimeError):
        split_failures([1, 2], lambda p: (_ for _ in ()).throw(RuntimeError("CUDA error: x")),
                       ValueError())


def test_output_processing_failing_for_everyone_stops_the_engine(tiny_llama):
    """Every request fails on its first token: the forward runs, yet no
    request makes progress, so the failures add up."""
    eng = make_engine(tiny_llama)
    eng.max_consecutive_failures = 4

    def broken(*_a, **_k):
        raise LookupError("tokenizer table gone")
    for i in range(2):
        eng.add_request(f"r{i}", prompt_token_ids=[5, 6 + i], params=GREEDY)
        eng.requests[f"r{i}"].stop.check = broken
    assert [o.error is not None for o in eng.step()] == [True, True]
    assert eng.failures_in_a_row == 2
    for i in range(2, 4):
        eng.add_request(f"r{i}", prompt_token_ids=[5, 6 + i], params=GREEDY)
        eng.requests[f"r{i}"].stop.check = broken
    with pytest.raises(EngineDeadError, match="4 requests failed in a row"):
        eng.step()


def test_a_hybrid_forward_that_fails_past_its_recurrent_layers_recomputes_the_others(tiny_checkpoints):
    """Qwen3-Next: the last layer raises for every batch holding the poison once it
    has three tokens, after the recurrent layers advanced every sequence's state. The
    poison fails alone; the others, whose states had seen their chunk, are preempted
    and recomputed (a second run of that chunk would advance them twice) and end with
    the tokens of a run without the poison."""
    path = tiny_checkpoints["qwen3_next"]
    want = {rid: r.token_ids for rid, r in zip(PROMPTS, make_engine(path).generate(PROMPTS.values(), GREEDY))}
    eng = make_engine(path)
    add_all(eng)
    eng.add_request("poison", prompt_token_ids=[9, 8, 7], params=GREEDY)
    batch: list[str] = []
    execute = eng.runner.execute

    def recording(scheduled, kv, on_layer_done=None):
        batch[:] = [s.seq.seq_id for s in scheduled]
        return execute(scheduled, kv, on_layer_done)

    last = eng.runner.model.layers[-1]
    forward = last.forward

    def failing(*args, **kwargs):
        poison = eng.requests.get("poison")
        if "poison" in batch and poison is not None and poison.seq.num_output_tokens >= 3:
            raise RuntimeError("the last layer broke")
        return forward(*args, **kwargs)

    eng.runner.execute, last.forward = recording, failing
    preemptions = eng.scheduler.num_preemptions
    toks, errors = run(eng)
    assert list(errors) == ["poison"] and "RuntimeError" in str(errors["poison"])
    assert {r: toks[r] for r in PROMPTS} == want
    assert eng.scheduler.num_preemptions - preemptions == len(PROMPTS)
    assert_clean(eng)
