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


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, logprobs: list[dict], text_offset: int) -> dict:
    """The /v1/completions ``logprobs`` object of some tokens; ``text_offset``
    is the text's length before them. An entry whose ``logprob`` is None (an
    echoed prompt's first token) reports null, alternatives too."""
    tokens, chosen, tops, offsets = [], [], [], []
    for lp in logprobs:
        tok = token_text(tokenizer, lp["token_id"])
        tokens.append(tok)
        scored = lp["logprob"] is not None
        chosen.append(finite(lp["logprob"]) if scored else None)
        tops.append({token_text(tokenizer, t): finite(v) for t, v in lp["top"]} if scored else None)
        offsets.append(text_offset)
        text_offset += len(tok)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}


def _chat_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
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


def echo_logprobs(tokenizer: Tokenizer, token_ids: list[int], prompt_lps: list | None) -> dict:
    """The completions ``logprobs`` object of the echoed prompt, offsets from 0."""
    lps = prompt_lps or [None] * len(token_ids)
    entries = [lp or {"token_id": t, "logprob": None, "top": None} for t, lp in zip(token_ids, lps)]
    return completion_logprobs(tokenizer, entries, 0)


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
        self._token_text_len = 0  # completions' text_offset counts token strings

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
            self.echo_logprobs = echo_logprobs(self.tokenizer, self.echo.token_ids,
                                               out.get("prompt_logprobs"))
            self._token_text_len = sum(len(t) for t in self.echo_logprobs["tokens"])
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
        obj = completion_logprobs(self.tokenizer, lps, self._token_text_len)
        self._token_text_len += sum(len(t) for t in obj["tokens"])
        return obj

    def final(self) -> dict:
        """The choice of a non-streaming response."""
        lp_obj = None
        if self.want_logprobs and self.kind == "chat":
            lp_obj = chat_logprobs(self.tokenizer, self.logprobs)
        elif self.want_logprobs:
            echoed = self.echo_logprobs
            start = sum(len(t) for t in echoed["tokens"]) if echoed is not None else 0
            lp_obj = completion_logprobs(self.tokenizer, self.logprobs, start)
            if echoed is not None:
                lp_obj = join_logprobs(echoed, lp_obj)
        if self.kind == "completion":
            return {"index": self.index, "text": self.text, "logprobs": lp_obj,
                    "finish_reason": self.finish_reason}
        return {"index": self.index, "message": self.chat.message(), "logprobs": lp_obj,
                "finish_reason": self.finish_reason}
