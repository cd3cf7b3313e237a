"""Per-request fault isolation inside an engine step.

A step's work is batched (one forward, one sampler call) but each row
belongs to one request. When batched work raises, ``split_failures`` runs
the batch again in halves until every part either runs or is a single
request that fails alone: k culprits among n requests cost about
2k log2(n) extra runs, and a batch that failed only for its size (no
culprit) runs as two halves. ``is_fatal`` names the errors no retry can
help, after which the engine stops: a CUDA error leaves the device context
unusable for every request.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from splitserve.engine.errors import EngineDeadError

T = TypeVar("T")
R = TypeVar("R")


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` breaks the engine itself rather than one request
    (EngineDeadError: e.g. a tensor-parallel step that failed part way)."""
    if isinstance(exc, EngineDeadError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


def split_failures(items: list[T], run: Callable[[list[T]], R], error: Exception
                   ) -> tuple[list[tuple[list[T], R]], list[tuple[T, Exception]]]:
    """``run(items)`` raised ``error``: run its halves, and the halves of
    each half that raises, down to single items. Returns the parts that ran
    (with ``run``'s result, in ``items`` order) and the items that failed
    alone (with their error). A fatal error (``is_fatal``) propagates."""
    ran: list[tuple[list[T], R]] = []
    failed: list[tuple[T, Exception]] = []

    def visit(part: list[T], err: Exception) -> None:
        if len(part) == 1:
            failed.append((part[0], err))
            return
        mid = len(part) // 2
        for half in (part[:mid], part[mid:]):
            try:
                result = run(half)
            except Exception as e:  # noqa: BLE001 - narrowed down below
                if is_fatal(e):
                    raise
                visit(half, e)
            else:
                ran.append((half, result))

    visit(items, error)
    return ran, failed
