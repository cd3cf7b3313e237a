import random

import pytest

from splitserve.engine.stop import StopChecker


def feed(checker: StopChecker, deltas: list[str]) -> list[tuple[str, bool]]:
    """Stream deltas the way a caller does: text_so_far is what was released."""
    released, results = "", []
    for d in deltas:
        emit, stopped = checker.check(released, d)
        released += emit
        results.append((emit, stopped))
    return results


def reference(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """Full output for the whole text: cut at the stop string that completes
    first (ties: the one starting first)."""
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, False
    end, start, _ = min(hits)
    return text[: end if include else start], True


def test_stop_inside_one_delta_is_cut_exactly():
    assert feed(StopChecker(["END"]), ["abc END def"]) == [("abc ", True)]
    assert feed(StopChecker(["END"], True), ["abc END def"]) == [("abc END", True)]


def test_stop_split_across_two_deltas():
    assert feed(StopChecker(["END"]), ["foo EN", "D bar"]) == [("foo ", False), ("", True)]
    assert feed(StopChecker(["END"], True), ["foo EN", "D bar"]) == [("foo ", False), ("END", True)]


def test_stop_split_across_many_deltas():
    deltas = ["x<", "|", "im_", "end", "|>tail"]
    assert feed(StopChecker(["<|im_end|>"]), deltas) == [
        ("x", False), ("", False), ("", False), ("", False), ("", True)]


def test_hold_back_is_released_once_it_cannot_start_a_stop():
    assert feed(StopChecker(["END"]), ["E", "N", "x"]) == [("", False), ("", False), ("ENx", False)]


def test_hold_back_shrinks_to_the_longest_live_prefix():
    # "aa" might start "aab"; "aaa" releases one "a" and keeps "aa"; "c" ends it.
    assert feed(StopChecker(["aab"]), ["aa", "a", "c"]) == [("", False), ("a", False), ("aac", False)]
    assert feed(StopChecker(["aab"]), ["aa", "a", "b!"]) == [("", False), ("a", False), ("", True)]


def test_flush_releases_the_held_tail():
    checker = StopChecker(["END"])
    assert feed(checker, ["done E"]) == [("done ", False)]
    assert checker.held == "E"
    assert checker.flush() == "E"
    assert checker.held == ""
    assert checker.flush() == ""


def test_overlapping_candidates_stop_at_the_first_to_complete():
    # "bc" completes before "abcd", so it wins even though "abcd" starts earlier.
    assert feed(StopChecker(["abcd", "bc"]), ["xabcd"]) == [("xa", True)]
    assert feed(StopChecker(["abcd", "bc"], True), ["xabcd"]) == [("xabc", True)]
    # Same end: the longer one (earlier start) wins.
    assert feed(StopChecker(["bc", "abc"]), ["xabc"]) == [("x", True)]
    assert feed(StopChecker(["\n", "\n\n"], True), ["a\n\nb"]) == [("a\n", True)]
    # Two stops, the later-listed one occurs first.
    assert feed(StopChecker(["zz", "y"]), ["ayzz"]) == [("a", True)]


def test_stopped_checker_returns_nothing_more():
    checker = StopChecker(["!"])
    assert checker.check("", "hi! there") == ("hi", True)
    assert checker.stopped
    assert checker.check("hi", "more") == ("", True)
    assert checker.flush() == ""


def test_no_stop_strings_passes_text_through():
    assert feed(StopChecker([]), ["a", "bc", ""]) == [("a", False), ("bc", False), ("", False)]


def test_text_so_far_must_be_the_released_text():
    checker = StopChecker(["END"])
    assert checker.check("", "ab E") == ("ab ", False)
    with pytest.raises(ValueError, match="released 3"):
        checker.check("ab E", "N")  # the held "E" is not released text


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="empty"):
        StopChecker(["ok", ""])


@pytest.mark.parametrize("include", [False, True])
def test_output_does_not_depend_on_how_text_is_split(include):
    rng = random.Random(7)
    alphabet = "abc\n"
    for _ in range(400):
        stops = list({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                      for _ in range(rng.randint(1, 3))})
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        checker = StopChecker(stops, include)
        results = feed(checker, deltas)
        out = "".join(e for e, _ in results)
        stopped = any(s for _, s in results)
        if not stopped:
            out += checker.flush()
        assert (out, stopped) == reference(text, stops, include), (stops, deltas)
        if stopped:  # after the stop, every later delta yields nothing
            first = [s for _, s in results].index(True)
            assert results[first + 1:] == [("", True)] * (len(results) - first - 1)
