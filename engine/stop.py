"""Stop strings over streamed text.

The detokenizer hands over text in deltas; a stop string may straddle two
of them ("...EN" + "D..."). ``StopChecker`` therefore holds back any tail
that could still grow into a stop string and releases it once it cannot
(or at ``flush()`` when the sequence ends for another reason), so a client
never receives text that a later delta reveals to be part of a stop string.

"Earliest" means the stop string that completes first, ties going to the
one that starts first. This is what a character-by-character stream would
find, so the output does not depend on how the text was cut into deltas:
with stops ["abcd", "bc"], "xabcd" stops at "bc" whether it arrives whole
or one character at a time.
"""

from __future__ import annotations


class StopChecker:
    def __init__(self, stop_strings: list[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must not be empty")
        self.stop_strings = list(dict.fromkeys(stop_strings))  # dedupe, keep order
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_len = max((len(s) for s in self.stop_strings), default=0)
        self._emitted = 0  # characters released to the caller so far
        self._held = ""  # received after those, kept back as a possible stop-string start
        self.stopped = False

    @property
    def held(self) -> str:
        """Text received but not yet released."""
        return self._held

    def check(self, text_so_far: str, new_text: str) -> tuple[str, bool]:
        """Take the next delta. ``text_so_far`` is the text this checker has
        released so far (the concatenation of its earlier ``emit`` results,
        i.e. what the client has). Returns the text to release now and
        whether a stop string was found; after a stop every call returns
        ("", True)."""
        if self.stopped:
            return "", True
        if len(text_so_far) != self._emitted:
            raise ValueError(
                f"text_so_far has {len(text_so_far)} characters but this checker has released "
                f"{self._emitted}; pass the concatenation of the text it returned"
            )
        # A released character never starts a stop string (it would have been
        # held), and the held text holds no complete one, so any match lies in
        # held + new_text and ends inside new_text.
        pending = self._held + new_text
        match = self._earliest_match(pending)
        if match is not None:
            start, end = match
            emit = pending[: end if self.include_stop_str_in_output else start]
            self._held = ""
            self.stopped = True
        else:
            release_to = len(pending) - self._prefix_tail_len(pending)
            emit = pending[:release_to]
            self._held = pending[release_to:]
        self._emitted += len(emit)
        return emit, self.stopped

    def flush(self) -> str:
        """The sequence ended for another reason: release what was held."""
        tail = self._held
        self._held = ""
        self._emitted += len(tail)
        return tail

    def _earliest_match(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the first stop string to complete in ``text``."""
        best: tuple[int, int] | None = None
        for s in self.stop_strings:
            pos = text.find(s)  # the first occurrence of s is its earliest-ending one
            if pos >= 0 and (best is None or (pos + len(s), pos) < (best[1], best[0])):
                best = (pos, pos + len(s))
        return best

    def _prefix_tail_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of
        some stop string, i.e. that a later delta may still complete."""
        for k in range(min(self._max_len - 1, len(text)), 0, -1):
            tail = text[len(text) - k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0
