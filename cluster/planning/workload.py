"""Workloads for the simulator: trace files and synthetic arrivals.

Every source yields ``TraceRequest``s in arrival order, lazily (a day of
trace need not sit in memory):

- Mooncake trace (JSONL), one object per line: ``timestamp`` (ms since the
  trace's start), ``input_length``, ``output_length``, ``hash_ids`` (one id
  per 512-token block of the prompt: equal ids are equal blocks, so they
  carry the prefix structure).
- Azure LLM inference trace (CSV) with header ``TIMESTAMP,ContextTokens,
  GeneratedTokens``; TIMESTAMP a date-time (``2023-11-16 18:15:46.6805900``)
  or seconds. Prompts share nothing.
- Synthetic: Poisson (burstiness 1) or gamma inter-arrival gaps at a rate
  that may follow a diurnal curve, lengths from the load generator's
  distributions (``splitserve.cluster.bench.datasets``), optional shared
  prefixes (a few system prompts, Zipf-popular).

A malformed line raises ``TraceError`` naming the file and line
(``trace.jsonl line 7: 'input_length' must be an integer >= 1, got 0``),
also for numbers no trace holds: a token count over ``MAX_TOKENS`` or a
request more than ``MAX_SPAN_S`` after the first (a unit slip, which would
otherwise have the simulator step through centuries). A UTF-8 byte-order
mark and CRLF line ends, which editors and spreadsheets write, are read.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np

from splitserve.cluster.bench.datasets import MAX_TOKENS, LengthDist

MOONCAKE_BLOCK_TOKENS = 512
MASK64 = (1 << 64) - 1
_UNIQUE_BASE = 1 << 48  # hash ids of prompts that share nothing: above any trace's ids
MAX_SPAN_S = 366 * 86400.0  # a year of trace, leap day included


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float  # seconds after the workload's start
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()  # prefix blocks, ``block_tokens`` tokens each
    block_tokens: int = MOONCAKE_BLOCK_TOKENS


def prompt_block_hashes(req: TraceRequest, index: int, block_size: int) -> list[int]:
    """Engine block hashes of the prompt's full ``block_size`` blocks: equal
    for two prompts exactly when their trace block ids agree up to that
    block (the chaining of ``splitserve.engine.hashing``, over ids instead
    of token contents). Blocks past the trace's ids are unique to the
    request (``index``)."""
    n = req.input_len // block_size
    ids, per = req.hash_ids, req.block_tokens
    out: list[int] = []
    chain = 0  # hash of the trace blocks so far
    j = 0
    for m, block in enumerate(ids):
        chain = hash((chain, block)) & MASK64
        end = min(n, (m + 1) * per // block_size)
        out.extend(hash((chain, k)) & MASK64 for k in range(j, end))
        j = end
    if j < n:  # the rest is the request's own
        own = hash((chain, _UNIQUE_BASE + index)) & MASK64
        out.extend(hash((own, k)) & MASK64 for k in range(j, n))
    return out


def _check_time_scale(path: str | Path, time_scale: float) -> Path:
    if not (isinstance(time_scale, (int, float)) and math.isfinite(time_scale) and time_scale > 0):
        raise TraceError(f"{path}: the time scale must be a number > 0, got {time_scale!r}")
    return Path(path)


def _lines(f, p: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line; a byte that is not UTF-8 fails
    naming its line."""
    for lineno, raw in enumerate(f, 1):  # f is binary: decoded here, line by line
        try:  # a byte-order mark (Windows editors, spreadsheets) is not part of the text
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise TraceError(f"{p} line {lineno}: not UTF-8 text (byte "
                             f"{e.object[e.start]:#04x}); a trace is a text file") from None


# -- Mooncake -------------------------------------------------------------------------
def _check_tokens(v: int | float, label: str, where: str) -> None:
    if v > MAX_TOKENS:
        shown = f"{v:g}" if isinstance(v, float) else v
        raise TraceError(f"{where}: {label} {shown} is over {MAX_TOKENS} tokens, longer than any "
                         "model's context")


def _check_span(t: float, start: float, label: str, where: str, unit: str) -> None:
    if t - start > MAX_SPAN_S:
        raise TraceError(f"{where}: {label} is more than {MAX_SPAN_S / 86400:.0f} days after the "
                         f"first request's; {unit}")


def _int_field(obj: dict, key: str, where: str, minimum: int) -> int:
    if key not in obj:
        raise TraceError(f"{where}: missing {key!r}")
    v = obj[key]
    # JSON's Infinity and NaN parse as floats; int() of them would raise
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v != int(v) or v < minimum:
        raise TraceError(f"{where}: {key!r} must be an integer >= {minimum}, got {v!r}")
    _check_tokens(v, repr(key), where)
    return int(v)


def read_mooncake(path: str | Path, time_scale: float = 1.0) -> Iterator[TraceRequest]:
    """Requests of a Mooncake JSONL trace; ``time_scale`` multiplies the gaps
    (0.5: twice the rate)."""
    p = _check_time_scale(path, time_scale)
    try:
        f = p.open("rb")
    except OSError as e:
        raise TraceError(f"{p}: cannot read: {e.strerror}") from None
    with f:
        start = None
        last = -math.inf
        for lineno, line in _lines(f, p):
            if not line.strip():
                continue
            where = f"{p} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "timestamp" not in obj or not isinstance(obj["timestamp"], (int, float)) \
                    or isinstance(obj["timestamp"], bool) or not math.isfinite(obj["timestamp"]):
                raise TraceError(f"{where}: 'timestamp' (milliseconds) must be a finite number")
            ts = float(obj["timestamp"]) / 1000.0
            if ts < last:
                raise TraceError(f"{where}: timestamp {obj['timestamp']} is before the previous "
                                 "line's; the trace must be in arrival order")
            last = ts
            start = ts if start is None else start
            _check_span(ts, start, f"timestamp {obj['timestamp']:g} ms", where,
                        "timestamps are milliseconds from the trace's start")
            n_in = _int_field(obj, "input_length", where, 1)
            n_out = _int_field(obj, "output_length", where, 1)
            ids = obj.get("hash_ids", [])
            if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                    for h in ids):
                raise TraceError(f"{where}: 'hash_ids' must be a list of integers")
            need = math.ceil(n_in / MOONCAKE_BLOCK_TOKENS)
            if len(ids) > need:
                raise TraceError(f"{where}: {len(ids)} hash_ids for {n_in} input tokens (at most "
                                 f"{need} blocks of {MOONCAKE_BLOCK_TOKENS})")
            yield TraceRequest((ts - start) * time_scale, n_in, n_out, tuple(ids))
        if start is None:
            raise TraceError(f"{p}: no requests (the file is empty); a Mooncake trace has one "
                             "JSON object per line")


# -- Azure ------------------------------------------------------------------------------
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _azure_time(text: str, where: str) -> float:
    text = text.strip()
    try:
        v = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(v):
            raise TraceError(f"{where}: TIMESTAMP {text!r} is not a finite number")
        return v
    # 7 fractional digits (the published traces) exceed what fromisoformat takes
    if "." in text:
        head, frac = text.rsplit(".", 1)
        text = f"{head}.{frac[:6]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise TraceError(f"{where}: TIMESTAMP {text!r} is neither seconds nor a date-time "
                         "like 2023-11-16 18:15:46.6805900") from None


def read_azure(path: str | Path, time_scale: float = 1.0) -> Iterator[TraceRequest]:
    p = _check_time_scale(path, time_scale)
    try:
        f = p.open("rb")
    except OSError as e:
        raise TraceError(f"{p}: cannot read: {e.strerror}") from None
    with f:
        reader = csv.reader(line for _, line in _lines(f, p))
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise TraceError(f"{p} line 1: not CSV: {e}") from None
        if header is None:
            raise TraceError(f"{p} line 1: empty file; expected the header {','.join(AZURE_COLUMNS)}")
        cols = [h.strip() for h in header]
        missing = [c for c in AZURE_COLUMNS if c not in cols]
        if missing:
            raise TraceError(f"{p} line 1: header lacks {missing}; expected {','.join(AZURE_COLUMNS)}")
        it, ic, ig = (cols.index(c) for c in AZURE_COLUMNS)
        start = None
        last = -math.inf
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise TraceError(f"{p} line {reader.line_num}: not CSV: {e}") from None
            where = f"{p} line {reader.line_num}"
            if not row or not "".join(row).strip():
                continue
            if len(row) < len(cols):
                raise TraceError(f"{where}: {len(row)} fields, the header has {len(cols)}")
            if any(x.strip() for x in row[len(cols):]):
                # a value past the last column: the row's fields are shifted (an
                # unquoted comma), so its columns cannot be trusted; an empty one
                # (a spreadsheet's trailing comma) is harmless
                raise TraceError(f"{where}: {len(row)} fields, the header has {len(cols)} "
                                 "(an unquoted comma?)")
            ts = _azure_time(row[it], where)
            if ts < last:
                raise TraceError(f"{where}: TIMESTAMP is before the previous row's; the trace "
                                 "must be in arrival order")
            last = ts
            start = ts if start is None else start
            _check_span(ts, start, f"TIMESTAMP {row[it].strip()}", where,
                        "TIMESTAMP is seconds or a date-time")
            vals = []
            for idx, name, low in ((ic, "ContextTokens", 1), (ig, "GeneratedTokens", 1)):
                try:
                    v = int(row[idx])
                except ValueError:
                    raise TraceError(f"{where}: {name} {row[idx]!r} is not an integer") from None
                if v < low:
                    raise TraceError(f"{where}: {name} must be >= {low}, got {v}")
                _check_tokens(v, name, where)
                vals.append(v)
            yield TraceRequest((ts - start) * time_scale, vals[0], vals[1])
        if start is None:
            raise TraceError(f"{p}: no requests (only the header); an Azure trace has one row "
                             "per request")


def read_trace(path: str | Path, time_scale: float = 1.0) -> Iterator[TraceRequest]:
    """By extension: .jsonl Mooncake, .csv Azure."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_mooncake(path, time_scale)
    if suffix == ".csv":
        return read_azure(path, time_scale)
    raise TraceError(f"{path}: unknown trace format {suffix!r}; use .jsonl (Mooncake: timestamp, "
                     "input_length, output_length, hash_ids) or .csv (Azure: TIMESTAMP, "
                     "ContextTokens, GeneratedTokens)")


# -- synthetic ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Diurnal:
    """Rate between ``trough`` and ``peak`` times the mean rate over a period,
    lowest at t = 0 and highest at half the period:
    rate(t) = mean x (trough + (peak - trough) (1 - cos(2 pi t / period)) / 2)."""

    period_s: float = 86400.0
    peak: float = 1.6
    trough: float = 0.4

    def __post_init__(self):
        if not all(math.isfinite(v) for v in (self.period_s, self.peak, self.trough)):
            raise ValueError("period, peak and trough must be finite numbers")
        if self.period_s <= 0 or self.trough <= 0 or self.peak < self.trough:
            raise ValueError(f"expected period > 0 and peak >= trough > 0, got period "
                             f"{self.period_s:g}, peak {self.peak:g}, trough {self.trough:g}")

    @classmethod
    def parse(cls, text: str, flag: str = "--diurnal") -> "Diurnal":
        """``PERIOD:PEAK:TROUGH``; ValueError naming ``flag``."""
        try:
            period, peak, trough = (float(x) for x in text.split(":"))
            return cls(period, peak, trough)
        except ValueError as e:
            why = str(e) if "expected" in str(e) or "finite" in str(e) else \
                "expected PERIOD:PEAK:TROUGH (seconds, then multiples of the mean rate)"
            raise ValueError(f"{flag} {text!r}: {why}") from None

    def factor(self, t: float) -> float:
        return self.trough + (self.peak - self.trough) * (1 - math.cos(2 * math.pi * t / self.period_s)) / 2

    def integral(self, t: float) -> float:
        """int_0^t factor(u) du."""
        w = 2 * math.pi / self.period_s
        mid = (self.peak + self.trough) / 2
        return mid * t - (self.peak - self.trough) / 2 * math.sin(w * t) / w

    def invert(self, x: float) -> float:
        """The t with integral(t) = x (integral is increasing)."""
        mid = (self.peak + self.trough) / 2
        t = x / mid
        for _ in range(50):  # Newton; factor >= trough > 0 so it converges
            err = self.integral(t) - x
            if abs(err) < 1e-9:
                break
            t -= err / self.factor(t)
        return t


PREFIX_BLOCK_TOKENS = 16  # granularity of synthetic shared prefixes
MAX_PREFIX_GROUPS = 1_000_000  # each group's popularity is one float drawn from per batch


@dataclass(frozen=True)
class PrefixSpec:
    """Shared prompt prefixes: ``groups`` system prompts of ``tokens`` tokens
    (rounded down to 16-token blocks), group g chosen with probability
    proportional to 1 / (g + 1) ** zipf."""

    groups: int
    tokens: int
    zipf: float = 1.0

    def __post_init__(self):
        if not 1 <= self.groups <= MAX_PREFIX_GROUPS:
            raise ValueError(f"--prefix-groups must be from 1 to {MAX_PREFIX_GROUPS}, "
                             f"got {self.groups}")
        if not PREFIX_BLOCK_TOKENS <= self.tokens <= MAX_TOKENS:
            raise ValueError(f"--prefix-tokens must be from {PREFIX_BLOCK_TOKENS} (one "
                             f"{PREFIX_BLOCK_TOKENS}-token block) to {MAX_TOKENS}, got {self.tokens}")
        if not (math.isfinite(self.zipf) and self.zipf >= 0):
            raise ValueError(f"prefix popularity exponent must be >= 0, got {self.zipf}")

    @classmethod
    def from_flags(cls, groups: int, tokens: int) -> "PrefixSpec | None":
        """``--prefix-groups`` and ``--prefix-tokens``: both or neither."""
        if not groups and not tokens:
            return None
        if not groups or not tokens:
            given, missing = (("--prefix-groups", "--prefix-tokens") if groups else
                              ("--prefix-tokens", "--prefix-groups"))
            raise ValueError(f"{given} needs {missing}: shared prefixes take both a count and "
                             "a length")
        return cls(groups, tokens)


def synthetic(rate: float, input_len: LengthDist, output_len: LengthDist, *, seed: int = 0,
              num_requests: int | None = None, duration_s: float | None = None,
              burstiness: float = 1.0, diurnal: Diurnal | None = None,
              prefix: PrefixSpec | None = None, batch: int = 4096) -> Iterator[TraceRequest]:
    """Gamma-renewal arrivals (Poisson at burstiness 1) at mean ``rate``
    req/s; with ``diurnal``, in the curve's operational time. Stops after
    ``num_requests`` or ``duration_s``, whichever comes first."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate}, {burstiness}")
    if num_requests is None and duration_s is None:
        raise ValueError("give num_requests or duration_s")
    rng = np.random.default_rng(seed)
    if prefix is not None:
        weights = 1.0 / np.arange(1, prefix.groups + 1) ** prefix.zipf
        weights /= weights.sum()
        blocks = prefix.tokens // PREFIX_BLOCK_TOKENS
    x = 0.0  # operational time: arrivals of a unit-rate process scaled by the rate
    made = 0
    while True:
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=batch)
        ins, outs = input_len.sample(batch, rng), output_len.sample(batch, rng)
        groups = rng.choice(prefix.groups, size=batch, p=weights) if prefix else None
        for i in range(batch):
            x += float(gaps[i])
            t = diurnal.invert(x) if diurnal else x
            if (num_requests is not None and made >= num_requests) or (
                    duration_s is not None and t > duration_s):
                return
            n_in = int(ins[i])
            ids: tuple[int, ...] = ()
            if prefix is not None:
                g = int(groups[i])
                # the group's prompt; a prompt shorter than it shares less
                ids = tuple(g * 65536 + b for b in range(min(blocks, n_in // PREFIX_BLOCK_TOKENS)))
            yield TraceRequest(t, n_in, int(outs[i]), ids, PREFIX_BLOCK_TOKENS)
            made += 1
