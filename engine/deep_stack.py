"""Running native code that recurses as deep as its input on threads with a
stack large enough for the largest input a request may carry.

llguidance compiles a grammar recursively over its rule references: a Lark
chain ``a: b``, ``b: c``... of about 2,700 rules (some 30 KB, well within
``MAX_SPEC_CHARS``) overflows an 8 MiB thread stack, and a stack overflow in
native code is a segmentation fault: the whole process dies (an ingress
replica, or an engine with every request it runs), not one request. Its
parser refuses deep nesting of parentheses, not deep chains of rules.

``run_deep(fn, *args)`` runs ``fn`` on one of a few threads whose stack is
``STACK_BYTES``: about 3 KB of stack per level of rules, and at most about
9,400 levels fit in ``MAX_SPEC_CHARS`` (``a: b`` lines of 7 characters), so
some 30 MiB is the deepest a request can reach; the rest is margin. The
stack is virtual memory until a deep grammar touches it.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

STACK_BYTES = 256 << 20
WORKERS = 4  # grammars compile in parallel, as on the compile threads that call here

T = TypeVar("T")

_lock = threading.Lock()
_jobs: "queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple]]" = queue.SimpleQueue()
_threads: set[int] = set()  # idents of the deep-stack threads


def run_deep(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a deep-stack thread (directly when already on one);
    its result or its exception, in the calling thread."""
    if threading.get_ident() in _threads:
        return fn(*args)
    _start()
    fut: Future = Future()
    _jobs.put((fut, fn, args))
    return fut.result()


def _start() -> None:
    if len(_threads) >= WORKERS:
        return
    with _lock:
        while len(_threads) < WORKERS:
            # threading.stack_size applies to threads started after it, in any
            # thread of the process: set only around these starts
            previous = threading.stack_size(STACK_BYTES)
            try:
                started = threading.Event()
                t = threading.Thread(target=_work, args=(started,), name="deep-stack", daemon=True)
                t.start()
            finally:
                threading.stack_size(previous)
            started.wait()


def _work(started: threading.Event) -> None:
    _threads.add(threading.get_ident())
    started.set()
    while True:
        fut, fn, args = _jobs.get()
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # the caller's to handle, in its own thread
            fut.set_exception(e)
