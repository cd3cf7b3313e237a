"""The OpenAI API's response objects: each choice's state as outputs
arrive (streamed deltas and the whole), the completions and chat logprobs
objects, echo, and usage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from splitserve.cluster.api.chat_output import ChatOutput
from splitserve.cluster.api.reasoning import Reasoning
from splitserve.cluster.api.tool_calls import ToolCalls
from splitserve.engine.tokenizer import Tokenizer

# JSON has no -inf; a token the request's filters removed reports this.
MIN_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


# How a token the tokenizer has no entry for is named (vLLM writes every token
# this way with return_tokens_as_token_ids); also the key of a completions
# top_logprobs alternative whose text another alternative already holds.
TOKEN_ID_NAME = "token_id:{}"


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The token's text as it appears in the output ("" for an id past the
    tokenizer's vocabulary: a model may pad its embeddings beyond it)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_name(tokenizer: Tokenizer, token_id: int) -> str:
    """What logprobs call a token: its text, or ``token_id:<id>`` when the
    tokenizer has no such token (its text would be "", indistinguishable
    from any other such id)."""
    if tokenizer.id_to_token(token_id) is None:
        return TOKEN_ID_NAME.format(token_id)
    return token_text(tokenizer, token_id)


def _top_dict(tokenizer: Tokenizer, top: list) -> dict[str, float]:
    """A completions ``top_logprobs`` dict, most probable first. Keys are
    token texts, and different tokens may share one (byte-level tokens that
    are parts of a UTF-8 character all decode to U+FFFD): a token whose
    text is already a key is keyed ``token_id:<id>`` instead, so no
    alternative is lost."""
    out: dict[str, float] = {}
    for t, v in top:
        name = token_name(tokenizer, t)
        out[TOKEN_ID_NAME.format(t) if name in out else name] = finite(v)
    return out


def _completion_logprobs(tokenizer: Tokenizer, logprobs: list[dict],
                         text_offset: int) -> tuple[dict, int]:
    """The completions ``logprobs`` object and the text offset after it:
    offsets count output text, in which a token named by its id has none."""
    tokens, chosen, tops, offsets = [], [], [], []
    for lp in logprobs:
        tokens.append(token_name(tokenizer, lp["token_id"]))
        scored = lp["logprob"] is not None
        chosen.append(finite(lp["logprob"]) if scored else None)
        tops.append(_top_dict(tokenizer, lp["top"]) if scored else None)
        offsets.append(text_offset)
        text_offset += len(token_text(tokenizer, lp["token_id"]))
    obj = {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}
    return obj, text_offset


def completion_logprobs(tokenizer: Tokenizer, logprobs: list[dict], text_offset: int) -> dict:
    """The /v1/completions ``logprobs`` object of some tokens; ``text_offset``
    is the text's length before them. An entry whose ``logprob`` is None (an
    echoed prompt's first token) reports null, alternatives too."""
    return _completion_logprobs(tokenizer, logprobs, text_offset)[0]


def _chat_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    """``bytes`` is null for a token named by its id (it has no text)."""
    if tokenizer.id_to_token(token_id) is None:
        return {"token": TOKEN_ID_NAME.format(token_id), "logprob": finite(logprob), "bytes": None}
    tok = token_text(tokenizer, token_id)
    return {"token": tok, "logprob": finite(logprob), "bytes": list(tok.encode("utf-8"))}


def chat_logprobs(tokenizer: Tokenizer, logprobs: list[dict]) -> dict:
    """The chat ``logprobs`` object ({"content": [...]}) of some tokens."""
    content = []
    for lp in logprobs:
        entry = _chat_entry(tokenizer, lp["token_id"], lp["logprob"])
        entry["top_logprobs"] = [_chat_entry(tokenizer, t, v) for t, v in lp["top"]]
        content.append(entry)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class Echo:
    """A completion's ``echo``: the prompt goes before the output (its
    tokens' logprobs too, the first one null); ``score_only`` (max_tokens
    0) drops the one token the engine sampled."""

    text: str
    token_ids: list[int]
    score_only: bool


def echo_logprobs(tokenizer: Tokenizer, token_ids: list[int],
                  prompt_lps: list | None) -> tuple[dict, int]:
    """The completions ``logprobs`` object of the echoed prompt, offsets from
    0, and the offset after it."""
    lps = prompt_lps or [None] * len(token_ids)
    entries = [lp or {"token_id": t, "logprob": None, "top": None} for t, lp in zip(token_ids, lps)]
    return _completion_logprobs(tokenizer, entries, 0)


def join_logprobs(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


class ChoiceState:
    """One choice of a response: what its outputs added up to so far, and
    the OpenAI JSON of each output (streaming) and of the whole (final)."""

    def __init__(self, index: int, kind: Kind, tokenizer: Tokenizer, want_logprobs: bool,
                 tool_calls: ToolCalls | None = None, echo: Echo | None = None,
                 reasoning: Reasoning | None = None):
        self.index, self.kind, self.tokenizer = index, kind, tokenizer
        self.want_logprobs = want_logprobs
        # chat: the output read for reasoning and tool calls
        self.chat = ChatOutput(reasoning, tool_calls) if kind == "chat" else None
        self.echo = echo
        self.text = ""
        self.logprobs: list[dict] = []
        self.echo_logprobs: dict | None = None  # the echoed prompt's, once it arrived
        self.finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self._token_text_len = 0  # completions' text_offset: the token texts so far
        self._echo_text_len = 0

    def opening_delta(self) -> dict:
        """Chat streams open each choice with the assistant role."""
        return {"index": self.index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}

    def add(self, out: dict) -> dict | None:
        """Record a backend output; return its streaming choice object, or
        None when it carries nothing to send (text held back by the
        detokenizer or a possible stop string)."""
        text, lps = out["text"], out.get("logprobs") or []
        if self.echo is not None and self.echo.score_only:
            text, lps = "", []
            out = {**out, "completion_tokens": 0, "finish_reason": "length"}
        prefix = ""
        echoing = self.echo is not None and self.echo_logprobs is None  # this output opens the choice
        if echoing:
            prefix = self.echo.text
            self.echo_logprobs, self._echo_text_len = echo_logprobs(
                self.tokenizer, self.echo.token_ids, out.get("prompt_logprobs"))
            self._token_text_len = self._echo_text_len
        text = prefix + text
        self.text += text
        self.logprobs += lps
        if out["finished"]:
            self.finish_reason = out["finish_reason"]
        self.prompt_tokens = out["prompt_tokens"]
        self.completion_tokens = out["completion_tokens"]
        self.cached_tokens = out["cached_tokens"]
        delta: dict[str, Any] = {"content": text} if text else {}
        if self.chat is not None:
            step = self.chat.step(text, len(out["token_ids"]), out["finished"], self.finish_reason)
            delta, self.finish_reason = step.openai(), step.finish_reason
        if not delta and not out["finished"] and not (self.want_logprobs and (lps or echoing)):
            return None
        lp_obj = self._logprobs(lps) if self.want_logprobs else None
        if echoing and lp_obj is not None:
            lp_obj = join_logprobs(self.echo_logprobs, lp_obj)
        if self.kind == "completion":
            return {"index": self.index, "text": text, "logprobs": lp_obj,
                    "finish_reason": self.finish_reason}
        return {"index": self.index, "delta": delta, "logprobs": lp_obj,
                "finish_reason": self.finish_reason}

    def _logprobs(self, lps: list[dict]) -> dict:
        if self.kind == "chat":
            return chat_logprobs(self.tokenizer, lps)
        obj, self._token_text_len = _completion_logprobs(self.tokenizer, lps, self._token_text_len)
        return obj

    def final(self) -> dict:
        """The choice of a non-streaming response."""
        lp_obj = None
        if self.want_logprobs and self.kind == "chat":
            lp_obj = chat_logprobs(self.tokenizer, self.logprobs)
        elif self.want_logprobs:
            echoed = self.echo_logprobs
            lp_obj = completion_logprobs(self.tokenizer, self.logprobs, self._echo_text_len)
            if echoed is not None:
                lp_obj = join_logprobs(echoed, lp_obj)
        if self.kind == "completion":
            return {"index": self.index, "text": self.text, "logprobs": lp_obj,
                    "finish_reason": self.finish_reason}
        return {"index": self.index, "message": self.chat.message(), "logprobs": lp_obj,
                "finish_reason": self.finish_reason}
