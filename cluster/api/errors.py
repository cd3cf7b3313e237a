"""The ingress's own failures of a request, apart from the engine's
(``splitserve.engine.errors``): each maps to an HTTP status and a gRPC code
in the API layers. Kept apart from ``backend`` so that processes that only
count them (the metrics of the router actor) import neither torch nor the
tokenizers."""

from __future__ import annotations

from splitserve.engine.errors import SplitserveError


class Overloaded(SplitserveError):
    """Queues are full; the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(SplitserveError):
    """No replica can take the request right now (none up, router down)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(SplitserveError):
    """A deadline between the ingress and a worker passed (no first token,
    or no next token, in time): the request was cancelled on the workers."""
