"""Admission control: a bounded number of in-flight requests per model.

The ingress calls ``admit(model)`` before routing a request and
``release(model)`` when it finishes (or fails) for good. A full model
refuses with OverloadedError whose ``retry_after_s`` estimates when a slot
frees: the recent mean interval between releases of that model, clamped.
"""

from __future__ import annotations

from typing import Callable

from splitserve.router.types import OverloadedError, UnbalancedReleaseError

# Weight of the newest interval in the release-interval average: about the
# last ten releases matter, so the estimate follows load changes within seconds.
RELEASE_INTERVAL_EWMA_ALPHA = 0.2


class AdmissionControl:
    def __init__(
        self,
        max_in_flight: int,
        retry_after_min_s: float,
        retry_after_max_s: float,
        clock: Callable[[], float],
    ):
        self.max_in_flight = max_in_flight
        self.retry_after_min_s = retry_after_min_s
        self.retry_after_max_s = retry_after_max_s
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._last_release: dict[str, float] = {}
        self._release_interval_s: dict[str, float] = {}  # EWMA per model

    def in_flight(self, model: str) -> int:
        return self._in_flight.get(model, 0)

    def admit(self, model: str, force: bool = False) -> None:
        """Take a slot for one request of ``model`` or raise OverloadedError.
        ``force``: take it even past the limit (a request admitted before,
        whose slot a restarted router learns again)."""
        n = self._in_flight.get(model, 0)
        if n >= self.max_in_flight and not force:
            raise OverloadedError(model, n, self.max_in_flight, self.retry_after_s(model))
        self._in_flight[model] = n + 1

    def check(self, model: str, needed: int) -> None:
        """Raise OverloadedError unless ``needed`` more requests of ``model``
        fit now (a request's choices, admitted together); takes nothing."""
        n = self._in_flight.get(model, 0)
        if n + needed > self.max_in_flight:
            raise OverloadedError(model, n, self.max_in_flight, self.retry_after_s(model), needed)

    def release(self, model: str, finished: bool = True) -> None:
        """Give back the slot of a request of ``model``. ``finished``: it ran
        to its end (only those time the release rate behind Retry-After)."""
        n = self._in_flight.get(model, 0)
        if n == 0:
            raise UnbalancedReleaseError(
                f"release({model!r}) without a matching admit: no request of it is in flight"
            )
        self._in_flight[model] = n - 1
        if not finished:
            return
        now = self._clock()
        last = self._last_release.get(model)
        self._last_release[model] = now
        if last is not None:
            interval = now - last
            if interval < 0.0:  # max(now - last, 0.0), without the builtin's cost
                interval = 0.0
            mean = self._release_interval_s.get(model)
            self._release_interval_s[model] = (
                interval if mean is None else mean + RELEASE_INTERVAL_EWMA_ALPHA * (interval - mean)
            )

    def retry_after_s(self, model: str) -> float:
        """Expected wait for a free slot: the mean release interval, clamped;
        the upper clamp until two releases have been seen."""
        mean = self._release_interval_s.get(model)
        if mean is None:
            return self.retry_after_max_s
        return self.clamp_retry_after(mean)

    def clamp_retry_after(self, seconds: float) -> float:
        """``seconds`` within [retry_after_min_s, retry_after_max_s]."""
        return min(max(seconds, self.retry_after_min_s), self.retry_after_max_s)
