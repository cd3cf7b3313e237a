"""What the load generator sends: synthetic length distributions and
ShareGPT-format conversation files.

Length distributions are written ``KIND:ARGS``:
  ``128`` or ``fixed:128``                 always 128
  ``uniform:64:256``                       integers in [64, 256]
  ``normal:128:32[:16:512]``               mean 128, std 32, clipped to [16, 512]
                                           (default clip: [1, mean + 4 std])
  ``lognormal:4.8:0.5[:16:2048]``          exp(N(4.8, 0.5)), clipped likewise
                                           (default clip: [1, 100 x median])
Lengths stop at ``MAX_TOKENS`` (a distribution asking for more is refused).
Synthetic prompts are random token ids (sent as ids, so their length is
exact whatever the tokenizer). ShareGPT files are a JSON list of
``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``:
the first human turn is the prompt and the reply's length the output length.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

KINDS = ("fixed", "uniform", "normal", "lognormal")
# a prompt or output longer than any model's context (the longest are ~10M
# tokens): a unit slip in a trace or a distribution, refused where it is read
MAX_TOKENS = 1 << 24


class DatasetError(ValueError):
    """A dataset file or length distribution that cannot be used."""


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]  # text, or token ids sent as they are
    prompt_len: int  # tokens (estimated for text without a tokenizer)
    output_len: int  # max_tokens asked for


@dataclass(frozen=True)
class LengthDist:
    kind: str
    params: tuple[float, ...]
    low: int = 1
    high: int | None = None

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        if self.kind == "fixed":
            return [int(self.params[0])] * n
        if self.kind == "uniform":
            lo, hi = self.params
            return [int(x) for x in rng.integers(int(lo), int(hi) + 1, size=n)]
        if self.kind == "normal":
            x = rng.normal(self.params[0], self.params[1], size=n)
        else:
            x = rng.lognormal(self.params[0], self.params[1], size=n)
        return [int(v) for v in np.clip(np.rint(x), self.low, self.high)]

    def __str__(self) -> str:
        args = ":".join(f"{p:g}" for p in self.params)
        clip = f":{self.low}:{self.high}" if self.kind in ("normal", "lognormal") else ""
        return f"{self.kind}:{args}{clip}"


def parse_length_dist(spec: str) -> LengthDist:
    """``"uniform:64:256"`` -> LengthDist; raises DatasetError with the rule broken."""
    parts = spec.strip().split(":")
    if len(parts) == 1:
        parts = ["fixed", parts[0]]
    kind, raw = parts[0].lower(), parts[1:]
    if kind not in KINDS:
        raise DatasetError(f"length distribution {spec!r}: kind must be one of {', '.join(KINDS)}")
    try:
        nums = [float(p) for p in raw]
    except ValueError:
        raise DatasetError(f"length distribution {spec!r}: arguments must be numbers") from None
    if not all(math.isfinite(x) for x in nums):
        raise DatasetError(f"length distribution {spec!r}: arguments must be finite numbers")
    want = {"fixed": (1,), "uniform": (2,), "normal": (2, 4), "lognormal": (2, 4)}[kind]
    if len(nums) not in want:
        raise DatasetError(f"length distribution {spec!r}: {kind} takes "
                           f"{' or '.join(str(w) for w in want)} numbers")
    too_long = DatasetError(f"length distribution {spec!r}: lengths must be <= {MAX_TOKENS} "
                            "tokens")
    if kind == "fixed":
        if nums[0] < 1:
            raise DatasetError(f"length distribution {spec!r}: the length must be >= 1")
        if nums[0] > MAX_TOKENS:
            raise too_long
        return LengthDist(kind, (nums[0],), int(nums[0]), int(nums[0]))
    if kind == "uniform":
        if not 1 <= nums[0] <= nums[1]:
            raise DatasetError(f"length distribution {spec!r}: need 1 <= low <= high")
        if nums[1] > MAX_TOKENS:
            raise too_long
        return LengthDist(kind, (nums[0], nums[1]), int(nums[0]), int(nums[1]))
    if nums[1] < 0:
        raise DatasetError(f"length distribution {spec!r}: the spread must be >= 0")
    if kind == "normal" and nums[0] > MAX_TOKENS:
        raise too_long
    if kind == "lognormal" and nums[0] > math.log(MAX_TOKENS):
        raise DatasetError(f"length distribution {spec!r}: its median exp({nums[0]:g}) is over "
                           f"{MAX_TOKENS} tokens")
    if len(nums) == 4:
        low, high = int(nums[2]), int(nums[3])
    elif kind == "normal":
        low, high = 1, max(1, int(math.ceil(nums[0] + 4 * nums[1])))
    else:
        low, high = 1, max(1, int(math.ceil(100 * math.exp(nums[0]))))
    if not 1 <= low <= high:
        raise DatasetError(f"length distribution {spec!r}: need 1 <= clip low <= clip high")
    # the default clip of a wide spread may pass the cap; the draws stop at it
    return LengthDist(kind, (nums[0], nums[1]), low, min(high, MAX_TOKENS))


def synthetic_requests(n: int, input_len: LengthDist, output_len: LengthDist, seed: int = 0,
                       token_range: tuple[int, int] = (10, 500)) -> list[BenchRequest]:
    """``n`` prompts of random token ids in ``token_range`` (high exclusive;
    the default fits every vocabulary of 512 tokens or more)."""
    rng = np.random.default_rng(seed)
    ins, outs = input_len.sample(n, rng), output_len.sample(n, rng)
    lo, hi = token_range
    return [BenchRequest([int(t) for t in rng.integers(lo, hi, size=i)], i, o)
            for i, o in zip(ins, outs)]


def _chars_to_tokens(text: str) -> int:
    # without a tokenizer: ~4 characters per token, the usual English BPE ratio
    return max(1, round(len(text) / 4))


def load_sharegpt(path: str | Path, n: int, seed: int = 0,
                  count_tokens: Callable[[str], int] | None = None, min_len: int = 4,
                  max_prompt_len: int = 1024, max_total_len: int = 2048,
                  output_len: int | None = None) -> list[BenchRequest]:
    """``n`` requests drawn (seeded shuffle) from a ShareGPT-format file.

    Lengths are counted with ``count_tokens`` (a tokenizer's) when given,
    else estimated at 4 characters per token. Conversations with fewer than
    two turns, a prompt or reply under ``min_len`` tokens, a prompt over
    ``max_prompt_len`` or prompt + reply over ``max_total_len`` are skipped
    (the usual ShareGPT filtering). ``output_len`` overrides reply lengths.
    Raises DatasetError when the file is unreadable or has fewer than ``n``
    usable conversations."""
    count = count_tokens or _chars_to_tokens
    try:
        # utf-8-sig: a byte-order mark (Windows editors) is not part of the JSON
        text = Path(path).read_text(encoding="utf-8-sig")
        data = json.loads(text)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read a JSON ShareGPT file: {e}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of conversations")
    for i, conv in enumerate(data):  # a shape no ShareGPT file has is an error, not a skip
        problem = _conversation_problem(conv)
        if problem:
            raise DatasetError(f"{path}: conversation {i + 1} (line {_entry_line(text, i)}): "
                               f"{problem}")
    order = np.random.default_rng(seed).permutation(len(data))
    out: list[BenchRequest] = []
    skipped = {"with fewer than 2 turns": 0, f"with a prompt or reply under {min_len} tokens": 0,
               f"with a prompt over {max_prompt_len} tokens": 0,
               f"over {max_total_len} tokens in all": 0}
    reasons = list(skipped)
    for i in order:
        conv = data[i]["conversations"]
        if len(conv) < 2:
            skipped[reasons[0]] += 1
            continue
        prompt, reply = conv[0]["value"], conv[1]["value"]
        p_len = count(prompt)
        o_len = output_len or count(reply)
        why = (reasons[1] if p_len < min_len or o_len < min_len else
               reasons[2] if p_len > max_prompt_len else
               reasons[3] if p_len + o_len > max_total_len else None)
        if why is not None:
            skipped[why] += 1
            continue
        out.append(BenchRequest(prompt, p_len, o_len))
        if len(out) == n:
            return out
    why = ", ".join(f"{k} {w}" for w, k in skipped.items() if k)
    raise DatasetError(f"{path}: only {len(out)} usable conversations, {n} asked for "
                       f"(filters: {min_len} <= lengths, prompt <= {max_prompt_len}, "
                       f"prompt + reply <= {max_total_len} tokens)" + (f"; skipped: {why}" if why else ""))


def _conversation_problem(conv) -> str | None:
    """What makes ``conv`` no ShareGPT conversation, or None. Only the first
    two turns are read (prompt, reply), so only they must hold text."""
    if not isinstance(conv, dict):
        return f"a conversation is an object, got {type(conv).__name__}"
    turns = conv.get("conversations")
    if turns is None:
        return ('no \'conversations\' list (ShareGPT: {"conversations": [{"from": "human", '
                '"value": "..."}, ...]})')
    if not isinstance(turns, list):
        return f"'conversations' must be a list of turns, got {type(turns).__name__}"
    for k, turn in enumerate(turns[:2]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"turn {k + 1} has no text 'value' (a string)"
    return None


def _entry_line(text: str, index: int) -> int:
    """The line (1-based) where the top-level JSON list in ``text`` holds
    its entry ``index``; called once, for an error."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    for i in range(index + 1):
        while text[pos] in " \t\r\n,":
            pos += 1
        if i == index:
            return text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)
    return 1
