"""KV hand-off between engines of different tensor-parallel degrees, on CPU
over gloo: prompts prefilled on one engine, their KV exported and imported
through the hand-off protocol (``tests.fixtures.handoff``), decoded on the
other, give exactly the tokens a single TP=1 engine generates: 1 -> 2,
2 -> 1, 2 -> 2, and layer group by layer group from inside the prefill
step (as the prefill worker exports) into a TP=2 decode engine; and a
latent cache (DeepSeek-V3's one plane, one KV head replicated on every
rank) 2 -> 1 -> 2."""

from __future__ import annotations

import random

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import IncompatibleKVError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.handoff import protocol
from splitserve.handoff.transfer.base import ChunkHeader
from tests.fixtures.handoff import export_meta, handoff_generate

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=0.8, seed=7, ignore_eos=True)
LENGTHS = [1, 4, 7, 13, 21]

pytestmark = pytest.mark.slow


def make(path, tp: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), num_blocks=96, block_size=4,
                                  max_num_batched_tokens=256, tensor_parallel_size=tp))


@pytest.fixture(scope="module")
def setup(tiny_checkpoints):
    path = tiny_checkpoints["qwen2"]  # q/k/v biases: a head slice out of place shows
    engines = {"tp1": make(path, 1), "tp2a": make(path, 2), "tp2b": make(path, 2)}
    rng = random.Random(3)
    prompts = [[rng.randrange(engines["tp1"].model_cfg.vocab_size) for _ in range(n)]
               for n in LENGTHS]
    ref = make(path, 1)
    want = {"greedy": [r.token_ids for r in ref.generate(prompts, GREEDY)],
            "seeded": [r.token_ids for r in ref.generate(prompts, SEEDED)]}
    yield engines, prompts, want
    for e in engines.values():
        e.close()


@pytest.mark.parametrize("src,dst", [("tp1", "tp2a"), ("tp2a", "tp1"), ("tp2a", "tp2b")])
def test_handoff_between_tp_degrees_matches_one_engine(setup, src, dst):
    engines, prompts, want = setup
    a, b = engines[src], engines[dst]
    assert handoff_generate(a, b, prompts, GREEDY) == want["greedy"]
    assert handoff_generate(a, b, prompts, SEEDED) == want["seeded"]
    for e in (a, b):
        e.kv.check_invariants()
        assert e.kv.all_free()


def test_layouts_of_different_degrees_pair(setup):
    engines, _, _ = setup
    one, two = (protocol.engine_layout(engines[k]) for k in ("tp1", "tp2a"))
    assert (one.tensor_parallel_size, two.tensor_parallel_size) == (1, 2)
    assert one.kv_heads() == two.kv_heads() == (0, engines["tp1"].model_cfg.num_kv_heads)
    one.check_compatible(two)
    narrower = type(two)(**{**two.to_dict(), "kv_head_end": 1})
    with pytest.raises(IncompatibleKVError, match="KV heads carried"):
        one.check_compatible(narrower)


def test_exported_heads_equal_a_tp1_engines(setup):
    # the gathered whole-head buffer is the TP=1 engine's cache content
    engines, prompts, _ = setup
    bufs = []
    for name in ("tp1", "tp2a"):
        e = engines[name]
        e.add_request("x", prompt_token_ids=prompts[-1], params=GREEDY, prefill_only=True)
        while e.has_unfinished():
            e.step()
        bufs.append(e.kv_port.export_layers("x", 0, e.model_cfg.num_layers))
        e.kv_port.release("x")
    assert bufs[0].shape == bufs[1].shape
    torch.testing.assert_close(bufs[1], bufs[0], rtol=1e-5, atol=1e-5)


def test_layer_groups_exported_inside_the_step_into_tp2(setup):
    """The prefill worker's way: each layer's KV gathered from the ranks as
    the step's forward finishes it, sent as its own chunk."""
    engines, prompts, want = setup
    src, dst = engines["tp2a"], engines["tp2b"]
    res = protocol.Reservations(dst.kv_port)
    out = {}
    for i, p in enumerate(prompts):
        rid = f"g{i}"
        src.add_request(rid, prompt_token_ids=p, params=GREEDY, prefill_only=True)
        chunks = []

        def listener(scheduled, rid=rid, chunks=chunks):
            if not any(s.seq.seq_id == rid and s.completes for s in scheduled):
                return None
            return lambda layer: chunks.append(
                (layer, src.kv_port.export_layers(rid, layer, layer + 1)))

        while src.has_unfinished():
            src.step(listener)
        meta = export_meta(src, rid)
        r = res.reserve(rid, meta.layout, meta.prompt_token_ids, GREEDY.max_tokens)
        for layer, buf in chunks:
            part = buf[:, :, r.num_cached_blocks:].contiguous()
            res.write_layers(ChunkHeader(rid, layer, layer + 1, tuple(part.shape), "float32",
                                         part.numel() * 4, 0), part)
        src.kv_port.release(rid)
        out[rid] = list(res.commit(meta).new_token_ids)
    while dst.has_unfinished():
        for o in dst.step():
            out[o.request_id] += o.new_token_ids
    assert [out[f"g{i}"] for i in range(len(prompts))] == want["greedy"]
    for e in (src, dst):
        e.kv.check_invariants()
        assert e.kv.all_free()


def test_import_from_a_transport_thread_while_the_tp2_engine_steps(setup):
    """Receivers write chunks from their own threads while the decode
    engine runs other sequences: the scatter to the ranks runs beside the
    step's collectives, on its own group."""
    import threading

    engines, prompts, want = setup
    src, dst = engines["tp1"], engines["tp2b"]
    busy = [p + [5] for p in prompts]  # other work on dst, stepping meanwhile
    ref = [r.token_ids for r in engines["tp1"].generate(busy, GREEDY)]
    for i, p in enumerate(busy):
        dst.add_request(f"busy{i}", prompt_token_ids=p, params=GREEDY)
    for i, p in enumerate(prompts):
        src.add_request(f"t{i}", prompt_token_ids=p, params=GREEDY, prefill_only=True)
    while src.has_unfinished():
        src.step()
    res = protocol.Reservations(dst.kv_port)
    metas = [export_meta(src, f"t{i}") for i in range(len(prompts))]
    reservations = [res.reserve(m.request_id, m.layout, m.prompt_token_ids, GREEDY.max_tokens)
                    for m in metas]
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            for m, r in zip(metas, reservations):
                buf = src.kv_port.export_layers(m.request_id, 0, src.model_cfg.num_layers)
                part = buf[:, :, r.num_cached_blocks:].contiguous()
                res.write_layers(ChunkHeader(m.request_id, 0, src.model_cfg.num_layers,
                                             tuple(part.shape), "float32", part.numel() * 4, 0),
                                 part)
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    out = {f"busy{i}": [] for i in range(len(busy))}
    receiver = threading.Thread(target=receive)
    receiver.start()
    while receiver.is_alive() or dst.has_unfinished():
        for o in dst.step():
            out[o.request_id] += o.new_token_ids
    receiver.join()
    assert not errors
    for m in metas:
        src.kv_port.release(m.request_id)
        out[m.request_id] = list(res.commit(m).new_token_ids)
    while dst.has_unfinished():
        for o in dst.step():
            out[o.request_id] += o.new_token_ids
    assert [out[f"busy{i}"] for i in range(len(busy))] == ref
    assert [out[f"t{i}"] for i in range(len(prompts))] == want["greedy"]
    for e in (src, dst):
        e.kv.check_invariants()
        assert e.kv.all_free()


def test_latent_cache_between_tp_degrees(tiny_checkpoints):
    # multi-head latent attention: every rank holds the one latent KV head (one plane);
    # the export reads rank 0's, the import writes it to both ranks
    path = tiny_checkpoints["deepseek_v3"]
    one, two = make(path, 1), make(path, 2)
    try:
        prompts = [list(range(20, 37)), [5, 9, 13], list(range(20, 37)) + [3, 4]]
        want = [r.token_ids for r in one.generate(prompts, GREEDY)]
        assert two.runner.kv_cache.shape[1::3] == (1, 1)  # planes, KV heads
        assert handoff_generate(two, one, prompts, GREEDY) == want
        assert handoff_generate(one, two, prompts, GREEDY) == want
        for e in (one, two):
            e.kv.check_invariants()
            assert e.kv.all_free()
    finally:
        two.close()
