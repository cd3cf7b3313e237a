"""POST /tokenize and POST /detokenize, in vLLM's request and response shapes.

  /tokenize    {model, prompt, add_special_tokens=true, return_token_strs}
               or {model, messages, add_generation_prompt=true,
               add_special_tokens=false, tools, chat_template_kwargs,
               return_token_strs}
               -> {count, max_model_len, tokens, token_strs}
  /detokenize  {model, tokens} -> {prompt}

The same checks and limits as the generation routes: the body read within
its size limit, strict fields, the prompt's characters bounded by the
context before tokenizing (splitserve.engine.limits), tools and template
arguments checked as for chat completions; the tokenizing itself runs on the
preparation pool (splitserve.cluster.api.prepare), never on the event loop.
A chat renders with the model's own template: vLLM's per-request
``chat_template``, ``continue_final_message`` and ``mm_processor_kwargs``
are accepted only at their defaults (400 naming the field otherwise).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from splitserve.cluster.api.backend import Backend
from splitserve.cluster.api.chat_prompt import check_chat_chars, json_chars, template_kwargs
from splitserve.cluster.api.http_body import parse_body, read_json
from splitserve.cluster.api.openai_schema import ChatMessage, RequestBody, messages_text_chars
from splitserve.cluster.api.prepare import PreparePool
from splitserve.cluster.api.tool_calls import template_messages, tool_request
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import check_prompt_chars
from splitserve.engine.tokenizer import Tokenizer



class TokenizeCompletion(RequestBody):
    model: str
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChat(RequestBody):
    model: str
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template writes BOS
    return_token_strs: bool | None = False
    tools: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        if not self.messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        for name in ("continue_final_message", "chat_template", "mm_processor_kwargs"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported: the model's chat template "
                                          "renders every conversation", param=name)
        template_kwargs(self.chat_template_kwargs)  # as chat completions check them

    def text_chars(self) -> int:
        """Characters of the messages' text (``messages_text_chars``)."""
        return messages_text_chars(self.messages)


class Detokenize(RequestBody):
    model: str
    tokens: list[int]


def _token_strs(backend: Backend, body, ids: list[int]) -> list[str] | None:
    if not body.return_token_strs:
        return None
    tokenizer = backend.tokenizer(body.model)
    return [tokenizer.id_to_token(i) or "" for i in ids]


def _tokenize_prompt(backend: Backend, body: TokenizeCompletion) -> tuple[list[int], list | None]:
    """On a preparation thread."""
    ids = backend.tokenizer(body.model).encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return ids, _token_strs(backend, body, ids)


def _tokenize_chat(backend: Backend, body: TokenizeChat) -> tuple[list[int], list | None]:
    """On a preparation thread."""
    tokenizer = backend.tokenizer(body.model)
    tools = tool_request(body.tools, "none", None, None).tools if body.tools else None
    messages = template_messages([m.to_template(i) for i, m in enumerate(body.messages)])
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                         tools=tools, **(body.chat_template_kwargs or {}))
    ids = tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
    return ids, _token_strs(backend, body, ids)


def detokenize_text(tokenizer: Tokenizer, tokens: list[int], model_vocab: int) -> str:
    """The text of ``tokens`` as a completion's text would hold it: an id the
    model can produce but its tokenizer lacks (a vocabulary padded past the
    tokenizer's) adds nothing, as in generated text; an id the model cannot
    produce is refused, naming ``tokens[i]``."""
    vocab = max(model_vocab, tokenizer.vocab_size)
    for i, t in enumerate(tokens):
        if not 0 <= t < vocab:
            raise InvalidRequestError(f"token id {t} is outside the vocabulary [0, {vocab})",
                                      param=f"tokens[{i}]")
    known = [t for t in tokens if t < tokenizer.vocab_size or tokenizer.id_to_token(t) is not None]
    return tokenizer.decode(known, skip_special_tokens=False)


def _detokenize(backend: Backend, body: Detokenize) -> str:
    """On a preparation thread."""
    return detokenize_text(backend.tokenizer(body.model), body.tokens,
                           backend.model_info(body.model).vocab_size)


def add_tokenize_routes(app: FastAPI, backend: Backend, max_body_bytes: int,
                        pool: PreparePool) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        data = await read_json(request, max_body_bytes)
        max_model_len = 0
        if "messages" in data:
            chat: TokenizeChat = parse_body(TokenizeChat, data)
            chat.check_supported()
            max_model_len = backend.model_info(chat.model).max_model_len
            check_chat_chars(chat.text_chars(), json_chars(chat.tools), json_chars(chat.chat_template_kwargs),
                             max_model_len)
            ids, strs = await pool.run(_tokenize_chat, backend, chat)
        else:
            plain: TokenizeCompletion = parse_body(TokenizeCompletion, data)
            max_model_len = backend.model_info(plain.model).max_model_len
            check_prompt_chars(len(plain.prompt), max_model_len, "prompt")
            ids, strs = await pool.run(_tokenize_prompt, backend, plain)
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
                "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body: Detokenize = parse_body(Detokenize, await read_json(request, max_body_bytes))
        max_model_len = backend.model_info(body.model).max_model_len
        if len(body.tokens) > max_model_len:
            raise InvalidRequestError(f"{len(body.tokens)} tokens: more than this model's context "
                                      f"of {max_model_len}", param="tokens")
        return {"prompt": await pool.run(_detokenize, backend, body)}
