"""Run an ``LLMEngine`` on its own thread and stream outputs to asyncio.

The engine is single-threaded by design: one thread owns it and steps it;
everything else (new requests, aborts, hand-off reservations and commits)
reaches it as commands executed between steps. Outputs go back to each
request's ``asyncio.Queue`` on the caller's event loop.

Failures: a request the engine failed alone (``LLMEngine.step``) ends its
stream with that RequestFailedError. When the engine thread ends (``stop``,
or a step that raised: the engine is broken) every command still queued
and every open stream ends with EngineDeadError, and later calls raise it
at once: nothing waits on a dead engine. A lock orders "is it running?
then queue" against "stop, then fail what is queued", so no command slips
in between.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from splitserve.engine.errors import (AdapterUnavailableError, EngineDeadError,
                                     InvalidRequestError, RequestFailedError, SplitserveError)
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.lora.adapter import AdapterRef
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineDeadError"]

_END = object()
log = logging.getLogger("splitserve.engine")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    q: asyncio.Queue

    def put(self, item) -> None:
        _deliver(self.loop, _put, self.q, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, name: str = "engine"):
        self.engine = engine
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # call's check-and-queue against _shut
        self.error: BaseException | None = None
        self.layer_listener = None  # see LLMEngine.step
        self._started = False
        # structured-output matchers compile here, not on the engine thread
        self._compile = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{name}-grammar")

    def start(self) -> "AsyncEngine":
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the engine thread after its current step; every queued
        command and open stream ends with EngineDeadError."""
        self._stopped.set()
        self._cmds.put(None)
        if self._started:
            self._thread.join(timeout)
        else:
            self._shut()
        self._compile.shutdown(wait=False, cancel_futures=True)

    @property
    def num_streams(self) -> int:
        """Requests whose outputs some caller is reading."""
        return len(self._streams)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    # -- engine thread ---------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stopped.is_set():
                block = not eng.has_unfinished()
                self._drain(block)
                if self._stopped.is_set():
                    break
                if not eng.has_unfinished():
                    continue
                for out in eng.step(self.layer_listener):
                    self._emit(out)
        except BaseException as e:  # the engine is unusable
            log.exception("engine thread %s failed; the engine is stopped", self._thread.name)
            self.error = e
        finally:
            self._shut()

    def _shut(self) -> None:
        """Mark the engine stopped, then end every queued command and open
        stream with EngineDeadError. Under the lock: ``call`` either queued
        before this (and is failed here) or sees the engine stopped."""
        err = (EngineDeadError(f"engine thread failed: {self.error!r}") if self.error is not None
               else EngineDeadError("the engine was stopped"))
        with self._lock:
            self._stopped.set()
            streams = list(self._streams.values())
            self._streams.clear()
            pending = []
            while True:
                try:
                    item = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    pending.append(item)
        for _fn, fut, loop in pending:
            _deliver(loop, _set_exc, fut, err)
        for st in streams:
            st.put(err)

    def _drain(self, block: bool) -> None:
        try:
            item = self._cmds.get(timeout=0.05) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, fut, loop = item
            try:
                res = fn(self.engine)
            except BaseException as e:  # delivered to the caller
                _deliver(loop, _set_exc, fut, e)
            else:
                _deliver(loop, _set_result, fut, res)
            try:
                item = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _emit(self, out: RequestOutput) -> None:
        # ``_streams`` is shared with the callers' event loop, which drops a
        # stream whose reader left at any moment: look up and remove only
        # with single dict operations, never ``del`` after a ``get``.
        s = self._streams.pop(out.request_id, None) if out.finished else \
            self._streams.get(out.request_id)
        if s is None:
            return
        if out.error is not None:  # the request failed alone
            s.put(out.error)
            return
        s.put(out)
        if out.finished:
            s.put(_END)

    # -- caller side -----------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps. Raises
        EngineDeadError when the engine stops before it ran."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if not self._started or self._stopped.is_set():
                raise EngineDeadError(f"engine is not running: {self.error!r}")
            self._cmds.put((fn, fut, loop))
        return await fut

    def _open_stream(self, request_id: str) -> _Stream:
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already streaming",
                                      param="request_id")
        s = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = s
        return s

    async def build_matcher(self, prompt_token_ids: list[int], params: SamplingParams):
        """``LLMEngine.build_matcher`` on a compile thread (None, at once,
        for an unconstrained request)."""
        if params.structured_output is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(
            self._compile, self.engine.build_matcher, prompt_token_ids, params)

    async def load_adapter(self, adapter: AdapterRef | None) -> None:
        """Have ``adapter`` in the engine's host memory: its files read on a
        compile thread (never the engine thread: an adapter is megabytes),
        then installed between steps. Raises AdapterUnavailableError when
        this engine serves no adapters or cannot read it here."""
        lora = self.engine.lora
        if adapter is None or (lora is not None and lora.has(adapter.key)):
            return
        if lora is None:
            raise AdapterUnavailableError("this engine serves no LoRA adapters (max_loras is 0)")
        weights = await asyncio.get_running_loop().run_in_executor(self._compile, lora.read, adapter)
        await self.call(lambda e: lora.install(weights))

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, prefill_only: bool = False,
                       matcher=None, adapter: AdapterRef | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Cancelling the iteration aborts it.
        A constrained request's matcher is built off the engine thread
        (or passed in, from ``build_matcher``); ``adapter``: the LoRA
        adapter it runs with (read off the engine thread when new here)."""
        stream = self._open_stream(request_id)
        try:
            await self.load_adapter(adapter)
            if matcher is None:
                matcher = await self.build_matcher(prompt_token_ids, params)
        except BaseException:
            self._streams.pop(request_id, None)
            raise

        def add(eng: LLMEngine):
            eng.add_request(request_id, params=params, prompt_token_ids=prompt_token_ids,
                            prefill_only=prefill_only, matcher=matcher, adapter=adapter)

        await self._start(add, request_id)
        async for out in self._iterate(request_id, stream):
            yield out

    async def adopt(self, fn: Callable[[LLMEngine], RequestOutput],
                    request_id: str) -> AsyncIterator[RequestOutput]:
        """Run ``fn`` (which admits the imported sequence ``request_id`` and
        returns its first output) on the engine thread, then stream the rest."""
        stream = self._open_stream(request_id)

        def run(eng: LLMEngine) -> None:
            try:
                out = fn(eng)
            except BaseException as e:
                eng.abort(request_id)  # what it held (a reservation, a half-admitted state)
                if isinstance(e, SplitserveError) or not isinstance(e, Exception):
                    raise
                raise RequestFailedError(f"request {request_id!r} failed on admission "
                                         f"({type(e).__name__}: {e})"[:400], request_id) from None
            self._emit(out)

        await self._start(run, request_id)
        async for out in self._iterate(request_id, stream):
            yield out

    async def _start(self, fn: Callable[[LLMEngine], Any], request_id: str) -> None:
        """Run the command that admits ``request_id``. A caller cancelled while
        it waits leaves the command queued: an abort queued behind it
        removes what it admits."""
        try:
            await self.call(fn)
        except BaseException as e:
            self._streams.pop(request_id, None)
            if isinstance(e, asyncio.CancelledError):  # not a refusal: the command still runs
                self._abort_detached(request_id)
            raise

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.q.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self._streams.pop(request_id, None)
                self._abort_detached(request_id)

    def _abort_detached(self, request_id: str) -> None:
        with self._lock:
            if not self._stopped.is_set():
                self._cmds.put((lambda eng: eng.abort(request_id), _Detached(), _DetachedLoop()))

    async def abort(self, request_id: str) -> bool:
        self._streams.pop(request_id, None)
        return await self.call(lambda eng: eng.abort(request_id))


def _deliver(loop, setter, fut, value) -> None:
    try:
        loop.call_soon_threadsafe(setter, fut, value)
    except RuntimeError:  # the caller's loop is closed: nobody waits
        pass


def _put(q: asyncio.Queue, item) -> None:
    q.put_nowait(item)


def _set_result(fut: asyncio.Future, res) -> None:
    if not fut.done():
        fut.set_result(res)


def _set_exc(fut: asyncio.Future, e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)


class _Detached:
    """A future nobody awaits (fire-and-forget commands from finalisers)."""

    def done(self) -> bool:
        return True


class _DetachedLoop:
    def call_soon_threadsafe(self, *a) -> None:
        pass

