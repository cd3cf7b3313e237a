"""What every ``splitserve`` subcommand shares: the help layout (each option
with its default), how an interrupt ends a command, and parsing of the
comma-separated and bounded numeric flags."""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import textwrap
from typing import Callable, Iterator


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default unless the text already
    states one (options whose default is None, nothing set, or False, a
    switch, show none). A paragraph of a description or epilog written on
    one line is wrapped; one with line breaks (examples) is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paras = text.split("\n\n")
        return "\n\n".join(
            p if "\n" in p else textwrap.fill(p, width, initial_indent=indent,
                                              subsequent_indent=indent)
            for p in paras)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if ("default" in text.lower() or d is None or d is False or d == []
                or d is argparse.SUPPRESS or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the command stops, removing what it had
    not finished writing (``main`` reports it and exits 130 / 143). A
    KeyboardInterrupt, so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


def install_interrupt_handlers() -> Callable[[], None]:
    """Ctrl-C and SIGTERM end a command through ``Interrupted``, also when the
    process was started with SIGINT ignored (a background job of a script):
    an explicit signal to the process is a request to stop. Returns what
    puts the previous handlers back."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, _raise_interrupted)

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    return restore


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a command writes its outputs, so they are
    written whole; a signal that arrived meanwhile is raised on exit."""
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda signum, _f: pending.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if pending:
        raise Interrupted(pending[0])


def int_list(flag: str, text: str, minimum: int = 1) -> tuple[int, ...]:
    """``"32,64"`` -> (32, 64); ValueError naming ``flag`` otherwise."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            v = int(item)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {item!r} is not an integer") from None
        if v < minimum:
            raise ValueError(f"{flag} {text!r}: values must be >= {minimum}, got {v}")
        out.append(v)
    if not out:
        raise ValueError(f"{flag}: give at least one value")
    return tuple(out)


def str_list(flag: str, text: str, allowed: Callable[[str], bool] | tuple[str, ...],
             expected: str = "") -> tuple[str, ...]:
    """Comma-separated words, each in ``allowed`` (a tuple, or a predicate
    with ``expected`` describing it); ValueError naming ``flag`` otherwise."""
    out = tuple(x.strip() for x in text.split(",") if x.strip())
    if not out:
        raise ValueError(f"{flag}: give at least one value")
    ok = allowed if callable(allowed) else (lambda v: v in allowed)
    bad = [v for v in out if not ok(v)]
    if bad:
        want = expected or ", ".join(allowed)  # type: ignore[arg-type]
        raise ValueError(f"{flag}: unknown value {bad[0]!r}; expected {want}")
    return out


def positive(kind: type = float, allow_zero: bool = False) -> Callable[[str], float | int]:
    """An argparse ``type`` taking numbers > 0 (>= 0 with ``allow_zero``)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")) or v < 0 or (v == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"must be {'>= 0' if allow_zero else '> 0'}, got {text!r}")
        return v
    parse.__name__ = f"{'non-negative' if allow_zero else 'positive'} {kind.__name__}"
    return parse


def fraction(text: str) -> float:
    """An argparse ``type`` taking a number from 0 to 1 (a rate)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v <= 1.0:  # NaN fails both
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text!r}")
    return v


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError when ``address`` (HOST:PORT of a Ray head) does
    not accept a TCP connection within ``timeout_s``: ``ray.init`` would
    otherwise retry for minutes. Other forms (``auto``, ``ray://``) pass."""
    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"{address!r} is not HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(f"nothing answers at {address} ({e.strerror or e})") from None


def device_arg(text: str) -> str:
    """An argparse ``type`` for an engine device: cpu, cuda or cuda:N."""
    t = text.strip().lower()
    if t in ("cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def device_problem(device: str) -> str | None:
    """Why the engine cannot run on ``device`` here (no CUDA device, or too
    few), or None."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"--device {device}: no CUDA device on this machine (use --device cpu)"
    index = int(device[5:]) if device[5:] else 0
    if index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def output_problem(flag: str, path: str | None, folder: bool) -> str | None:
    """Why ``path`` (a file, or a ``folder`` with ``folder``) cannot be
    written, or None; checked before a command's work, which its outputs
    come after. Missing folders on the way are fine (they are made); a
    file where a folder must be, or a folder this user cannot write, is not."""
    import os
    from pathlib import Path

    if not path:
        return None
    p = Path(path)
    if p.is_dir() and not folder:
        return f"{flag} {path}: is a directory; give a file name"
    if p.exists() and not p.is_dir() and folder:
        return f"{flag} {path}: is a file; {flag} takes a directory"
    parent = p.parent if not p.exists() or not folder else p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: cannot write in {parent} (permission denied)"
    return None
