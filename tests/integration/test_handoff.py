"""Prefill -> KV transfer -> decode hand-off between two engines over real
gRPC on loopback: parity with a single engine, and every failure ending in a
defined state with all blocks back in both pools."""

import asyncio
import json
import time

import grpc
import pytest

from splitserve.handoff.messages import PrefillMode
from splitserve.handoff.rpc import RpcError
from splitserve.engine.sampling_params import SamplingParams
from tests.integration.pd_harness import make_engine, start_pd, wait_until

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def prompts(n, vocab, seed=0):
    import random

    rng = random.Random(seed)
    lengths = [1, 3, 4, 5, 9, 16, 17, 30][:n]
    return [[rng.randrange(vocab) for _ in range(k)] for k in lengths]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return make_engine(tiny_llama)


def expected(reference, ps, params=GREEDY):
    return [r.token_ids for r in reference.generate(ps, params)]


@pytest.mark.parametrize("transport", ["grpc", "torch_dist", "inproc"])
def test_concurrent_handoffs_match_single_engine(tiny_llama, reference, transport):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama), transport=transport)
        try:
            ps = prompts(8, reference.model_cfg.vocab_size)
            got = await asyncio.gather(*[pd.generate(p, GREEDY) for p in ps])
            assert [g[0] for g in got] == expected(reference, ps)
            assert all(g[1].mode is PrefillMode.REMOTE for g in got)
            s = await pd.decode.stats()
            assert s.handoffs == 8 and s.fallbacks == 0
            assert await wait_until(pd.all_free)
        finally:
            await pd.close()
    asyncio.run(main())


def test_sampling_parameters_survive_the_handoff(tiny_llama, reference):
    # the first token is sampled on prefill, the rest on decode: both must
    # apply every parameter (bias, penalties, seed) the same way
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=7, ignore_eos=True,
                            repetition_penalty=1.3, frequency_penalty=0.4,
                            logit_bias={3: 4.0, 5: -100.0, 9: 2.5})

    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama))
        try:
            ps = prompts(4, reference.model_cfg.vocab_size, seed=5)
            got = await asyncio.gather(*[pd.generate(p, params) for p in ps])
            assert [g[0] for g in got] == expected(reference, ps, params)
            assert all(5 not in g[0] for g in got)
            assert await wait_until(pd.all_free)
        finally:
            await pd.close()
    asyncio.run(main())


def test_structured_output_survives_the_handoff(tiny_llama, reference):
    # prefill samples the first token under the grammar; decode rebuilds the
    # matcher from it and carries on: the same tokens as one engine, valid JSON
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 999},
                                               "s": {"type": "string", "maxLength": 5}},
              "required": ["n", "s"], "additionalProperties": False}
    spec = {"type": "json", "value": json.dumps(schema)}
    params = [SamplingParams(max_tokens=40, temperature=t, seed=3, structured_output=spec)
              for t in (0.0, 1.0)]

    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama))
        try:
            ps = prompts(4, reference.model_cfg.vocab_size, seed=9)
            for sp in params:
                got = await asyncio.gather(*[pd.generate(p, sp) for p in ps])
                assert [g[0] for g in got] == expected(reference, ps, sp)
                texts = [reference.tokenizer.decode(g[0]) for g in got]
                assert all(set(json.loads(t)) == {"n", "s"} for t in texts), texts
            assert await wait_until(pd.all_free)
        finally:
            await pd.close()
    asyncio.run(main())


def test_decode_prefix_cache_skips_blocks_it_holds(tiny_llama, reference):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama))
        try:
            p = prompts(8, reference.model_cfg.vocab_size, seed=3)[-1]  # 30 tokens
            a = await pd.generate(p, GREEDY)
            b = await pd.generate(p, GREEDY)
            assert a[0] == b[0] == expected(reference, [p])[0]
            # 30 tokens = 8 blocks of 4; 7 full blocks are cached the second time
            assert b[1].bytes == a[1].bytes // 8
            assert await wait_until(pd.all_free)
        finally:
            await pd.close()
    asyncio.run(main())


def _stop_prefill_on_first_chunk(pd, loop):
    stopped = []

    def hook():
        if not stopped:
            stopped.append(1)
            fut = asyncio.run_coroutine_threadsafe(pd.servers[0].stop(0), loop)
            fut.result(5)
    return hook


@pytest.mark.parametrize("policy", ["local", "error"])
def test_prefill_killed_mid_transfer(tiny_llama, reference, policy):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama), policy=policy)
        pd.on_chunk(_stop_prefill_on_first_chunk(pd, asyncio.get_running_loop()))
        try:
            p = prompts(8, reference.model_cfg.vocab_size)[5]
            if policy == "local":
                toks, t = await pd.generate(p, GREEDY)
                assert toks == expected(reference, [p])[0]
                assert t.mode is PrefillMode.LOCAL and t.fallback_reason is not None
                assert (await pd.decode.stats()).fallbacks == 1
            else:
                with pytest.raises(RpcError) as e:
                    await pd.generate(p, GREEDY)
                assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert await wait_until(pd.all_free, 10)
        finally:
            await pd.close()
    asyncio.run(main())


@pytest.mark.parametrize("fault", [False, True])
def test_prompt_logprobs_across_the_handoff_and_the_local_fallback(tiny_llama, reference, fault):
    """Scored by the prefill replica and carried with the KV, or, when the
    prefill replica dies mid-transfer, scored again by the decode replica."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    p = prompts(8, reference.model_cfg.vocab_size)[6]
    want = reference.generate([p], params)[0]

    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama))
        if fault:
            pd.on_chunk(_stop_prefill_on_first_chunk(pd, asyncio.get_running_loop()))
        try:
            outs = [o async for o in pd.client.generate(pd.request(p, params))]
            assert outs[0].timings.mode is (PrefillMode.LOCAL if fault else PrefillMode.REMOTE)
            got = outs[0].prompt_logprobs
            assert got[0] is None and [d.token_id for d in got[1:]] == p[1:]
            assert [d.logprob for d in got[1:]] == pytest.approx(
                [lp.logprob for lp in want.prompt_logprobs[1:]], abs=1e-4)
            assert [[t for t, _ in d.top] for d in got[1:]] == [
                [t for t, _ in lp.top] for lp in want.prompt_logprobs[1:]]
            assert all(o.prompt_logprobs is None and o.timings is None for o in outs[1:])
            assert [t for o in outs for t in o.token_ids] == want.token_ids
            assert await wait_until(pd.all_free, 10)
        finally:
            await pd.close()
    asyncio.run(main())


def test_transfer_timeout_falls_back_and_frees(tiny_llama, reference):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama), transfer_timeout_s=0.3)
        pd.on_chunk(lambda: time.sleep(1.0))  # a stalled link
        try:
            p = prompts(8, reference.model_cfg.vocab_size)[4]
            t0 = time.monotonic()
            toks, t = await pd.generate(p, GREEDY)
            assert toks == expected(reference, [p])[0]
            assert t.mode is PrefillMode.LOCAL and "DEADLINE_EXCEEDED" in t.fallback_reason
            assert time.monotonic() - t0 < 5
            assert await wait_until(pd.all_free, 10)
            assert pd.prefill.failed == 1
        finally:
            await pd.close()
    asyncio.run(main())


def test_checksum_mismatch_is_caught(tiny_llama, reference):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama))
        pd.corrupt_chunks()
        try:
            p = prompts(8, reference.model_cfg.vocab_size)[6]
            toks, t = await pd.generate(p, GREEDY)
            assert toks == expected(reference, [p])[0]  # never garbage
            assert t.mode is PrefillMode.LOCAL and "crc32" in t.fallback_reason
            assert await wait_until(pd.all_free, 10)
        finally:
            await pd.close()
    asyncio.run(main())


def test_client_cancel_mid_transfer_frees_both_sides(tiny_llama, reference):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama))
        pd.on_chunk(lambda: time.sleep(0.5))
        try:
            p = prompts(8, reference.model_cfg.vocab_size)[7]
            task = asyncio.ensure_future(pd.generate(p, GREEDY))
            assert await wait_until(lambda: len(pd.decode.reservations) == 1, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await wait_until(pd.all_free, 10)
            assert len(pd.decode.reservations) == 0
        finally:
            await pd.close()
    asyncio.run(main())


def test_mismatched_pair_refused_at_handshake(tiny_llama):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama, block_size=8),
                            policy="error")
        try:
            with pytest.raises(RpcError) as e:
                await pd.generate([1, 2, 3, 4, 5], GREEDY)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "block_size" in e.value.message
            assert pd.prefill.engine.step_count == 0  # refused before any work
            assert await wait_until(pd.all_free)
        finally:
            await pd.close()
    asyncio.run(main())


def test_reservation_lease_expires(tiny_llama):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama), lease_s=0.2)
        try:
            res = pd.decode.reservations
            await pd.decode.aengine.call(
                lambda e: res.reserve("orphan", res.layout, list(range(1, 20)), 4))
            assert pd.decode.engine.kv.num_free_blocks == 64 - 5
            assert await wait_until(pd.all_free, 3)
            assert (await pd.decode.stats()).expired == 1
        finally:
            await pd.close()
    asyncio.run(main())


def test_full_decode_refuses_with_resource_exhausted(tiny_llama, reference):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama, num_blocks=16),
                            policy="error")
        try:
            vocab = reference.model_cfg.vocab_size
            # another hand-off holds 10 of the 16 blocks (a lease does not end
            # on its own, so the refusal below does not race it)
            res = pd.decode.reservations
            await pd.decode.aengine.call(
                lambda e: res.reserve("holder", res.layout, [i % vocab for i in range(40)], 1))
            assert pd.decode.engine.kv.num_free_blocks == 6
            with pytest.raises(RpcError) as e:
                await pd.generate([(7 * i) % vocab for i in range(40)], GREEDY)
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert pd.decode.engine.kv.num_free_blocks == 6  # the refusal took nothing
            await pd.decode.aengine.call(lambda e: res.cancel("holder"))
            assert await wait_until(pd.all_free)
        finally:
            await pd.close()
    asyncio.run(main())


def test_decode_killed_while_holding_reservation_frees_prefill(tiny_llama, reference):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama), transfer_timeout_s=2.0)
        loop = asyncio.get_running_loop()
        killed = []

        def kill_decode():
            # the decode replica goes away mid-transfer: its KV receiver and
            # its RPC server stop, as when the process dies
            if not killed:
                killed.append(1)
                pd.decode.receiver.stop(0)
                asyncio.run_coroutine_threadsafe(pd.servers[1].stop(0), loop).result(5)
                raise ConnectionResetError("receiver gone")
        pd.on_chunk(kill_decode)
        try:
            p = prompts(8, reference.model_cfg.vocab_size)[7]
            with pytest.raises(RpcError) as e:
                await pd.generate(p, GREEDY)
            assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
            # prefill's blocks come back once its transfer fails (within its deadline)
            assert await wait_until(pd.prefill.engine.kv.all_free, 5)
            assert pd.prefill.failed == 1
            assert not pd.prefill._handoffs
        finally:
            await pd.close()
    asyncio.run(main())
