"""The ingress's per-request CPU work, off the event loop and bounded.

Tokenizing a prompt, rendering a chat template and compiling a grammar
take microseconds for most requests and seconds for a few; on the event
loop, one such request would stall every stream the ingress serves. Both
APIs (HTTP and gRPC) hand that work to one ``PreparePool`` per process:
``threads`` jobs run at a time, the rest wait in arrival order, and past
``max_waiting`` queued jobs a request is refused with ``Overloaded`` (HTTP
429 / gRPC RESOURCE_EXHAUSTED) instead of queueing without bound.

The threads share the GIL with the loop: ``Tokenizer.encode`` releases it
for long texts and llguidance compiles grammars in native code; a chat
template renders in Python, which yields the GIL every few milliseconds.
Cheap checks that bound this work (the prompt's length in characters, the
caps of splitserve.engine.limits) run before it, on the loop.

A small job (``run(..., size=)`` at most ``INLINE_SIZE``: a prompt of a few
hundred words, no grammar, no tools) runs on the loop instead: it takes
tens of microseconds, less than handing it to a thread and back (two thread
switches: 0.2 ms at the median and 2.3 ms at the 90th percentile on a loaded
2-core host; docs/benchmarks.md, "Per-request overhead of the serving path").
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from splitserve.cluster.api.backend import Overloaded

T = TypeVar("T")

DEFAULT_THREADS = min(4, os.cpu_count() or 1)
DEFAULT_MAX_WAITING = 1024
# characters (or prompt tokens) of a job that runs on the loop: a short text
# tokenizes in ~50 us, a short chat renders in ~100 us
INLINE_SIZE = 2048
INLINE_MESSAGES = 16  # chat messages: each is a template loop iteration
RETRY_AFTER_S = 1.0


class PreparePool:
    def __init__(self, threads: int = DEFAULT_THREADS, max_waiting: int = DEFAULT_MAX_WAITING):
        if threads < 1 or max_waiting < 0:
            raise ValueError(f"need threads >= 1 and max_waiting >= 0, got {threads}, {max_waiting}")
        self.threads, self.max_waiting = threads, max_waiting
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="splitserve-prepare")
        self._lock = threading.Lock()  # the HTTP and gRPC servers may run on different loops
        self._jobs = 0  # submitted and not yet finished (or cancelled)

    @property
    def jobs(self) -> int:
        return self._jobs

    async def run(self, fn: Callable[..., T], *args, size: int | None = None) -> T:
        """``fn(*args)`` on a pool thread; its result or exception. A caller
        cancelled while the job waits takes it out of the queue; one that
        has started runs to its end (its result is dropped). ``size``: the
        characters (or prompt tokens) the job reads, given only for a job
        that compiles no grammar; at most ``INLINE_SIZE``, it runs here."""
        if size is not None and size <= INLINE_SIZE:
            return fn(*args)
        with self._lock:
            if self._jobs >= self.threads + self.max_waiting:
                raise Overloaded(f"the ingress is preparing {self._jobs} requests; retry after "
                                 f"{RETRY_AFTER_S:g} s", RETRY_AFTER_S)
            self._jobs += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)  # counts a job until its thread is free
        return await asyncio.wrap_future(future)

    def _done(self, _future) -> None:
        with self._lock:
            self._jobs -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_shared: PreparePool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> PreparePool:
    """The process's pool, which the HTTP and gRPC servers share unless
    given their own."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PreparePool()
        return _shared
