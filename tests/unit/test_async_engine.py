"""AsyncEngine: streams, duplicate ids, cancellation, a dead engine."""

import asyncio
import threading

import pytest

from splitserve.engine.async_engine import AsyncEngine, EngineDeadError
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.structured import PARAM
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


def test_one_id_names_one_sequence_across_requests_and_reservations(tiny_llama):
    """A request id held by an open hand-off reservation cannot start a local
    request, and a running request's id cannot be reserved: two sequences
    sharing an id would share (and free) one block table."""
    from splitserve.handoff.protocol import Reservations

    eng = make_engine(tiny_llama)
    res = Reservations(eng.kv_port)
    res.reserve("held", res.layout, [5, 6, 7, 8, 9], 4)
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request("held", prompt_token_ids=[1, 2, 3], params=SP)
    eng.add_request("running", prompt_token_ids=[1, 2, 3], params=SP)
    eng.step()
    with pytest.raises(InvalidRequestError, match="already in use"):
        res.reserve("running", res.layout, [1, 2, 3], 4)
    eng.abort("running")
    assert res.cancel("held")
    assert eng.kv.all_free()


def test_abort_of_a_request_waiting_for_its_kv_closes_the_reservation(tiny_llama):
    from splitserve.handoff.protocol import Reservations
    from splitserve.handoff.transfer.errors import UnknownHandoffError

    eng = make_engine(tiny_llama)
    res = Reservations(eng.kv_port)
    res.reserve("r1", res.layout, list(range(3, 40)), 4)
    assert not eng.kv.all_free()
    assert eng.abort("r1")  # known: it was a reservation
    assert len(res) == 0 and eng.kv.all_free()
    with pytest.raises(UnknownHandoffError):
        res.expect("r1")  # a late KV push is refused, not written into freed blocks
    assert not eng.abort("r1")


def test_cancelled_before_admission_leaves_nothing_running(tiny_llama):
    """A caller cancelled while its admission command waits in the queue:
    the command still runs, and the abort queued behind it removes the
    request."""
    eng = make_engine(tiny_llama)

    async def main():
        a = AsyncEngine(eng).start()
        try:
            gate = asyncio.Event()
            started = asyncio.Event()

            def slow(e):  # hold the engine thread until the request is queued
                loop.call_soon_threadsafe(started.set)
                import time
                deadline = time.monotonic() + 5
                while not gate.is_set() and time.monotonic() < deadline:
                    time.sleep(0.005)
            loop = asyncio.get_running_loop()
            blocker = asyncio.ensure_future(a.call(slow))
            await started.wait()
            gen = a.generate("orphan", list(range(1, 30)), SP)
            task = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0.05)  # the add command is queued behind ``slow``
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.set()
            await blocker
            # the add and the abort ran back to back: the 200-token request never ran
            return await a.call(lambda e: (e.kv.all_free(), e.has_unfinished(), "orphan" in e.requests,
                                           e.step_count))
        finally:
            a.stop()
    assert asyncio.run(main()) == (True, False, False, 0)


def test_reader_leaving_as_its_request_finishes_does_not_kill_the_engine(tiny_llama):
    """The callers' loop drops the stream of a reader that left at any
    moment, also between the engine thread's lookup of that stream and its
    removal after the last output."""
    from splitserve.engine.outputs import RequestOutput

    class LeavingReader(dict):
        def get(self, key, default=None):  # the reader leaves right after the lookup
            value = super().get(key, default)
            self.pop(key, None)
            return value

    a = AsyncEngine(make_engine(tiny_llama))

    async def main():
        a._streams = LeavingReader()
        for finished in (False, True):
            a._open_stream("r")
            a._emit(RequestOutput("r", [3], "", finished, "length" if finished else None, 3, 1))
        assert not a._streams
    asyncio.run(main())


def test_load_stats_show_request_state_until_it_is_gone(tiny_llama):
    from tests.fixtures.worker_stats import decode_stats, prefill_stats

    eng = make_engine(tiny_llama)
    assert eng.load_stats().idle()
    eng.add_request("a", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=2))
    eng.step()
    s = eng.load_stats()
    assert (s.open_requests, s.block_owners, s.running, s.steps) == (1, 1, 1, 1)
    assert not s.idle()
    while eng.has_unfinished():
        eng.step()
    s = eng.load_stats()
    assert s.idle() and (s.steps, s.prompt_tokens_computed) == (2, 3)
    assert prefill_stats(s).idle() and decode_stats(s).idle()
    assert not prefill_stats(s, streams=1).idle()
    assert not prefill_stats(s, inflight=1).idle()
    assert not decode_stats(s, streams=1).idle()
    assert not decode_stats(s, reservations=1).idle()


def test_grammar_matchers_are_built_off_the_engine_thread(tiny_llama):
    """A large schema compiles for tens of milliseconds: never on the thread
    that steps every running sequence. Outputs equal the engine's own."""
    eng = make_engine(tiny_llama)
    spec = {"type": "regex", "value": "[a-z]{3,8}"}
    sp = SamplingParams(max_tokens=10, temperature=0.0, structured_output=spec)
    want = make_engine(tiny_llama).generate([[5, 6, 7]], sp)[0].token_ids
    built_on = []
    build = eng.grammar.matcher

    def recording(*a, **k):
        built_on.append(threading.current_thread().name)
        return build(*a, **k)

    eng.grammar.matcher = recording

    async def main():
        a = AsyncEngine(eng, name="engine-under-test").start()
        try:
            toks = []
            async for out in a.generate("r", [5, 6, 7], sp):
                toks += out.new_token_ids
            with pytest.raises(InvalidRequestError) as e:  # a bad grammar: refused, nothing held
                await a.generate("bad", [5, 6], SamplingParams(
                    structured_output={"type": "regex", "value": "(a"})).__anext__()
            assert e.value.param == PARAM and a.num_streams == 0
            return toks
        finally:
            a.stop()
    assert asyncio.run(main()) == want
    assert built_on and all(n.startswith("engine-under-test-grammar") for n in built_on)
    assert eng.kv.all_free()


def test_a_request_that_makes_the_engine_raise_fails_alone(tiny_llama):
    """Four streams share the batch; the fifth's last token is made to fall
    outside the vocabulary on the engine thread after its third output, so
    its next forward really raises. Its stream ends with RequestFailedError;
    the others get their reference tokens and the engine keeps running."""
    from splitserve.engine.errors import RequestFailedError

    eng = make_engine(tiny_llama)
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], [11, 12], [40, 41, 42, 43, 44], [3]]
    want = [r.token_ids for r in make_engine(tiny_llama).generate(prompts, sp)]
    # long enough that the engine cannot finish it before the corruption
    # lands, however far a loaded machine lets it run ahead of this loop
    long_sp = SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True)

    async def main():
        a = AsyncEngine(eng).start()
        try:
            async def good(i):
                return [t async for out in a.generate(f"r{i}", prompts[i], sp)
                        for t in out.new_token_ids]

            async def poison():
                got = []
                with pytest.raises(RequestFailedError, match="the model forward") as e:
                    async for out in a.generate("poison", [9, 8, 7], long_sp):
                        got += out.new_token_ids
                        if len(got) == 3:
                            def corrupt(en):
                                en.requests["poison"].seq.token_ids[-1] = en.model_cfg.vocab_size
                            await a.call(corrupt)
                assert e.value.request_id == "poison"
                return got
            *outs, got = await asyncio.gather(*[good(i) for i in range(4)], poison())
            # the corruption runs between two steps, after however many more
            # tokens the engine made while this loop caught up; far from the end
            assert outs == want and 3 <= len(got) < long_sp.max_tokens
            assert a.alive and a.num_streams == 0
            return await a.call(lambda e: (e.kv.check_invariants(), e.kv.all_free(),
                                           e.num_failed_requests))
        finally:
            a.stop()
    assert asyncio.run(main()) == (None, True, 1)


def test_every_queued_command_and_stream_resolves_when_the_engine_stops(tiny_llama):
    """Commands queued behind a slow one, and an open stream, when stop() is
    called: the commands queued before it still run, the stream ends with
    EngineDeadError, none hangs; later calls fail fast."""
    eng = make_engine(tiny_llama)

    async def main():
        a = AsyncEngine(eng).start()
        started = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow(e):
            loop.call_soon_threadsafe(started.set)
            import time
            time.sleep(0.3)
        blocker = asyncio.ensure_future(a.call(slow))
        await started.wait()
        stream = a.generate("s", [1, 2, 3], SP)
        first = asyncio.ensure_future(stream.__anext__())
        queued = [asyncio.ensure_future(a.call(lambda e: len(e.requests))) for _ in range(5)]
        await asyncio.sleep(0.05)
        a.stop(timeout=5.0)
        results = await asyncio.wait_for(
            asyncio.gather(blocker, first, *queued, return_exceptions=True), timeout=5.0)
        assert results[0] is None and results[2:] == [1] * 5  # ran before the stop
        assert isinstance(results[1], EngineDeadError), results
        with pytest.raises(EngineDeadError, match="not running"):
            await a.call(lambda e: None)
    asyncio.run(main())


def test_a_crash_resolves_commands_queued_behind_the_failing_step(tiny_llama):
    """The step raises a device error while commands wait for it."""
    eng = make_engine(tiny_llama)

    async def main():
        a = AsyncEngine(eng).start()
        gate, entered = __import__("threading").Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        execute = eng.runner.execute

        def device_error(scheduled, kv, on_layer_done=None):
            loop.call_soon_threadsafe(entered.set)
            gate.wait(5)
            raise RuntimeError("CUDA error: device-side assert triggered")
        eng.runner.execute = device_error
        stream = a.generate("s", [1, 2, 3], SP)
        first = asyncio.ensure_future(stream.__anext__())
        await entered.wait()
        queued = [asyncio.ensure_future(a.call(lambda e: e.num_running)) for _ in range(5)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True),
                                         timeout=5.0)
        eng.runner.execute = execute
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "CUDA error" in str(results[0]) and not a.alive
    asyncio.run(main())


def test_a_commit_that_raises_frees_the_reservation(tiny_llama):
    """The adopted sequence's first token breaks output processing: the
    stream fails with RequestFailedError and the reserved blocks are freed."""
    from splitserve.engine.errors import RequestFailedError
    from splitserve.handoff.protocol import Reservations

    eng = make_engine(tiny_llama)
    res = Reservations(eng.kv_port)

    async def main():
        a = AsyncEngine(eng).start()
        try:
            await a.call(lambda e: res.reserve("h", res.layout, [5, 6, 7, 8, 9], 4))

            def commit(e):
                st = e.new_request_state("h", [5, 6, 7, 8, 9], SP, None)
                res.cancel("h")  # stands for the lease the commit takes over
                e.kv.reserve("h", [], 5)
                e.requests["h"] = st
                raise KeyError("no such token")
            with pytest.raises(RequestFailedError, match="failed on admission"):
                async for _ in a.adopt(commit, "h"):
                    pass
            return await a.call(lambda e: (e.kv.all_free(), "h" in e.requests))
        finally:
            a.stop()
    assert asyncio.run(main()) == (True, False)
