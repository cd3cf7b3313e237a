"""How many tokens a request of a model will likely produce.

Placement holds KV room for the prompt plus this estimate, not for
``max_tokens``: clients ask for far more than they use (a 4096 cap for a
60-token answer), and reserving the cap turns a pool that could run 30
sequences into one that runs 3. A low guess costs little: the decode
engine preempts (recomputes) a sequence that outgrows the free blocks.

The estimate is a quantile (``RouterConfig.output_tokens_quantile``) of
the output lengths of the model's last ``WINDOW`` finished requests, which
the ingress reports with each release; until ``MIN_SAMPLES`` have been
seen it is the operator's ``expected_output_tokens``. Plain integers, no
clock: the same lengths give the same estimate.
"""

from __future__ import annotations

from collections import deque

WINDOW = 512  # finished requests per model the quantile is taken over
MIN_SAMPLES = 16  # fewer than this: the configured expectation
REFRESH_EVERY = 32  # observations between two sorts of the window


class OutputLengths:
    def __init__(self, expected_tokens: int, quantile: float):
        """``expected_tokens``: the estimate before enough outputs were seen;
        0 means "no estimate": every request reserves its ``max_tokens``."""
        self.expected_tokens = expected_tokens
        self.quantile = quantile
        self._window: dict[str, deque[int]] = {}
        self._since_refresh: dict[str, int] = {}
        self._estimate: dict[str, int] = {}

    def observe(self, model: str, output_tokens: int) -> None:
        """A request of ``model`` finished after producing ``output_tokens``."""
        if self.expected_tokens <= 0 or output_tokens < 0:
            return
        window = self._window.get(model)
        if window is None:
            window = self._window[model] = deque(maxlen=WINDOW)
        window.append(output_tokens)
        n = self._since_refresh.get(model, 0) + 1
        if len(window) >= MIN_SAMPLES and (n >= REFRESH_EVERY or model not in self._estimate):
            ordered = sorted(window)
            self._estimate[model] = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
            n = 0
        self._since_refresh[model] = n

    def expected(self, model: str, max_tokens: int) -> int:
        """Output tokens to hold KV room for: the estimate, at least 1 and at
        most the request's ``max_tokens``."""
        if self.expected_tokens <= 0:
            return max_tokens
        guess = self._estimate.get(model, self.expected_tokens)
        return max(1, min(guess, max_tokens))

    def samples(self, model: str) -> int:
        return len(self._window.get(model, ()))
