"""AsyncEngine: streams, duplicate ids, cancellation, a dead engine."""

import asyncio

import pytest

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from tests.integration.pd_harness import make_engine

SP = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


def test_duplicate_request_id_is_refused_and_original_continues(tiny_llama):
    eng = make_engine(tiny_llama)
    ref = make_engine(tiny_llama).generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0,
                                                                        ignore_eos=True))[0]

    async def main():
        a = AsyncEngine(eng).start()
        try:
            sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            gen = a.generate("same", [5, 6, 7], sp)
            first = await gen.__anext__()
            with pytest.raises(InvalidRequestError) as e:
                await a.generate("same", [1, 2], sp).__anext__()
            assert e.value.param == "request_id"
            toks = list(first.new_token_ids)
            async for out in gen:
                toks += out.new_token_ids
            assert toks == ref.token_ids
        finally:
            a.stop()
    asyncio.run(main())
    assert eng.kv.all_free()


def test_closing_the_stream_aborts_and_frees(tiny_llama):
    eng = make_engine(tiny_llama)

    async def main():
        a = AsyncEngine(eng).start()
        try:
            gen = a.generate("r", list(range(1, 30)), SP)
            await gen.__anext__()
            await gen.aclose()
            for _ in range(100):
                if await a.call(lambda e: e.kv.all_free() and not e.has_unfinished()):
                    return True
                await asyncio.sleep(0.02)
            return False
        finally:
            a.stop()
    assert asyncio.run(main())


def test_dead_engine_fails_streams_with_engine_dead(tiny_llama):
    eng = make_engine(tiny_llama)

    def broken(*a, **k):
        raise RuntimeError("device lost")

    async def main():
        a = AsyncEngine(eng).start()
        eng.runner.execute = broken
        with pytest.raises(EngineDeadError):
            async for _ in a.generate("r", [1, 2, 3], SP):
                pass
        assert not a.alive
        with pytest.raises(EngineDeadError):
            await a.call(lambda e: None)
    asyncio.run(main())
