"""PreparePool runs request preparation on its own threads, a bounded
number at a time and a bounded number waiting; Tokenizer.encode lets other
threads run while it tokenizes a long text."""

import asyncio
import threading
import time

import pytest

from splitserve.cluster.api.backend import Overloaded
from splitserve.cluster.api.prepare import PreparePool
from splitserve.engine.tokenizer import Tokenizer


@pytest.fixture
def pool():
    p = PreparePool(threads=2, max_waiting=2)
    yield p
    p.close()


def test_work_runs_off_the_calling_thread_and_its_errors_come_back(pool):
    async def main():
        name = await pool.run(lambda: threading.current_thread().name)
        assert name.startswith("splitserve-prepare") and name != threading.current_thread().name
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
    asyncio.run(main())
    assert pool.jobs == 0


def test_threads_bound_the_running_jobs_and_max_waiting_the_queue(pool):
    gate, running, peak = threading.Event(), [0], [0]
    lock = threading.Lock()

    def job():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(10)
        with lock:
            running[0] -= 1
        return 1

    async def main():
        tasks = [asyncio.ensure_future(pool.run(job)) for _ in range(4)]  # 2 run, 2 wait
        await asyncio.sleep(0.2)
        with pytest.raises(Overloaded) as e:
            await pool.run(job)
        assert e.value.retry_after_s > 0
        gate.set()
        assert await asyncio.gather(*tasks) == [1, 1, 1, 1]
    asyncio.run(main())
    assert peak[0] == 2 and pool.jobs == 0


def test_a_cancelled_waiting_job_never_runs(pool):
    gate, ran = threading.Event(), []

    async def main():
        busy = [asyncio.ensure_future(pool.run(gate.wait, 10)) for _ in range(2)]
        waiting = asyncio.ensure_future(pool.run(ran.append, "late"))
        await asyncio.sleep(0.1)
        waiting.cancel()
        await asyncio.sleep(0.1)
        assert pool.jobs == 2  # the cancelled job left the queue
        gate.set()
        await asyncio.gather(*busy)
    asyncio.run(main())
    assert ran == [] and pool.jobs == 0


def test_long_texts_encode_to_the_same_ids_with_other_threads_running(tiny_tokenizer_dir):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    text = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 3000
    for t in (text[:100], text[:5000], text[:50000]):
        for special in (True, False):
            assert tok.encode(t, special) == tok.backend.encode(t, add_special_tokens=special).ids
    ticks, done = [], threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.002)

    t = threading.Thread(target=ticker)
    t.start()
    start = time.perf_counter()
    for _ in range(2):
        tok.encode(text)
    end = time.perf_counter()
    done.set()
    t.join()
    inside = [start] + [x for x in ticks if start < x < end] + [end]
    longest = max(b - a for a, b in zip(inside, inside[1:]))
    # held GIL: one gap as long as the encoding; released: the ticker keeps ticking
    assert longest < max(0.2, (end - start) / 3), (longest, end - start)


def test_a_small_job_runs_on_the_loop_and_a_large_or_unsized_one_on_a_thread(pool):
    from splitserve.cluster.api.prepare import INLINE_SIZE

    async def main():
        here = threading.current_thread().name
        name = lambda: threading.current_thread().name  # noqa: E731
        assert await pool.run(name, size=0) == here
        assert await pool.run(name, size=INLINE_SIZE) == here
        assert (await pool.run(name, size=INLINE_SIZE + 1)).startswith("splitserve-prepare")
        assert (await pool.run(name)).startswith("splitserve-prepare")  # e.g. a grammar
        with pytest.raises(ZeroDivisionError):  # its error comes back the same way
            await pool.run(lambda: 1 / 0, size=1)
    asyncio.run(main())
    assert pool.jobs == 0
