"""Tokenizer of a Hugging Face checkpoint directory, without transformers.

``Tokenizer`` wraps the ``tokenizers`` library (tokenizer.json) and adds what
transformers layers on top from tokenizer_config.json: the named special
tokens (bos/eos/pad/unk), declared added tokens and the chat template.
Behaviour follows transformers' fast tokenizers so that token ids agree with
what the checkpoint's authors saw. ``IncrementalDetokenizer`` turns a stream
of generated ids into text deltas for streaming responses.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken

from splitserve.engine.checkpoint_files import read_json
from splitserve.engine.errors import CheckpointError, InvalidRequestError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Texts this long are encoded with the GIL released (a few microseconds more per call).
_RELEASE_GIL_CHARS = 4096


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _chat_template(root: Path, config: dict[str, Any]) -> str | None:
    # transformers >= 4.43 saves the template as its own file, which wins.
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.config = config or {}
        self.chat_template = chat_template
        self._add_declared_special_tokens()
        self.special_tokens = {
            key: tok for key in SPECIAL_TOKEN_KEYS if (tok := _content(self.config.get(key)))
        }
        self.special_token_ids = frozenset(
            i for i, t in self.backend.get_added_tokens_decoder().items() if t.special
        )
        eos = [self.token_to_id(self.special_tokens["eos_token"])] if "eos_token" in self.special_tokens else []
        gen_eos = (generation_config or {}).get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        root = Path(path).expanduser()
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(
                f"{root}: tokenizer.json not found (only fast tokenizers in tokenizer.json are supported)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise CheckpointError(f"{tok_file}: cannot be parsed: {e}") from None
        config = read_json(root / "tokenizer_config.json", "tokenizer config", required=False)
        return cls(
            backend,
            config,
            generation_config=read_json(root / "generation_config.json", "generation config",
                                        required=False),
            chat_template=_chat_template(root, config),
        )

    def _add_declared_special_tokens(self) -> None:
        # tokenizer_config.json may declare tokens tokenizer.json lacks; transformers adds them.
        declared = [
            (_content(spec), not isinstance(spec, dict) or bool(spec.get("special", True)))
            for _, spec in sorted(
                (self.config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])
            )
        ]
        declared += [(_content(self.config.get(key)), True) for key in SPECIAL_TOKEN_KEYS]
        for content, special in declared:
            if content is None or self.backend.token_to_id(content) is not None:
                continue
            token = AddedToken(content, special=special, normalized=False)
            if special:
                self.backend.add_special_tokens([token])
            else:
                self.backend.add_tokens([token])

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included (len(tokenizer) in transformers)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special_tokens.get("bos_token")
        return self.token_to_id(bos) if bos is not None else None

    @property
    def pad_token_id(self) -> int | None:
        pad = self.special_tokens.get("pad_token")
        return self.token_to_id(pad) if pad is not None else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens (BOS...) are those tokenizer.json's
        post-processor adds; like transformers >= 5, add_bos_token/add_eos_token
        in tokenizer_config.json do not override it. Use add_special_tokens=False
        on the output of ``apply_chat_template``, whose template writes BOS."""
        if len(text) >= _RELEASE_GIL_CHARS:
            # the same ids; encode_batch releases the GIL while it works (encode
            # holds it: a 4 MB text would stop every other thread for seconds)
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for a conversation, rendered with the checkpoint's
        chat template in a sandbox. Extra keyword arguments reach the template
        (e.g. ``enable_thinking`` for Qwen3). Raises InvalidRequestError for
        malformed messages or when the template rejects them."""
        variables = {**self.special_tokens, **template_kwargs}
        return render_chat_template(self.chat_template, messages, add_generation_prompt, tools, variables)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Prompt ids of a conversation: the rendered template encoded without
        adding special tokens again (the template already wrote BOS)."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers in some
    templates): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates come with downloaded checkpoints: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _check_messages(messages: Any, tools: Any) -> list[dict[str, Any]]:
    """Messages as the template sees them: keys with None values dropped."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise InvalidRequestError(f"messages[{i}].role must be a non-empty string", param="messages")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string or a list of parts", param="messages"
            )
        if isinstance(content, list) and not all(isinstance(p, dict) for p in content):
            raise InvalidRequestError(f"messages[{i}].content parts must be objects", param="messages")
        checked.append({k: v for k, v in m.items() if v is not None})
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise InvalidRequestError("tools must be a list of objects", param="tools")
    return checked


def render_chat_template(
    template: str | None,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    variables: dict[str, Any] | None = None,
) -> str:
    """Render a chat template the way transformers does (same environment,
    helpers and variables). ``variables``: special tokens and extra template
    arguments; they cannot replace messages, tools or add_generation_prompt."""
    if not template:
        raise InvalidRequestError(
            "this model has no chat template; send a plain prompt instead", param="messages"
        )
    checked = _check_messages(messages, tools)
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"chat template does not parse: {e}") from None
    try:
        context = dict(variables or {})
        context.update(messages=checked, tools=tools, documents=None,
                       add_generation_prompt=add_generation_prompt)
        return compiled.render(context)
    except jinja2.TemplateError as e:  # raise_exception() and sandbox violations
        raise InvalidRequestError(f"chat template rejected the messages: {e}", param="messages") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise InvalidRequestError(
            f"chat template cannot render these messages: {type(e).__name__}: {e}", param="messages"
        ) from None


# Prompt tokens the first decode looks back over, so that a leading space or
# a byte sequence begun in the prompt decodes as it would in context.
INITIAL_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text deltas for a growing output, never splitting a UTF-8 character.

    Keeps two offsets into all ids: text up to ``read_offset`` has been
    emitted; decoding from ``prefix_offset`` (a few tokens earlier) gives the
    context a delta needs. A delta ending in U+FFFD ends in a character whose
    bytes may not all have arrived: that last character is held back until
    they do (or ``flush``), while the text before it goes out at once. Only
    the last replacement character can still change (UTF-8 resynchronises:
    bytes that follow never alter the characters before an incomplete
    sequence), so a model emitting invalid bytes streams its U+FFFDs one step
    late instead of holding the whole output to the end. The deltas
    concatenate to ``tokenizer.decode(output_ids)`` for byte-level BPE
    tokenizers.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - INITIAL_CONTEXT_TOKENS, 0)
        self.read_offset = len(self.ids)
        self.num_prompt_ids = len(self.ids)
        # characters of the pending text (after ``read_offset``) already sent
        self.sent = 0

    @property
    def output_ids(self) -> list[int]:
        return self.ids[self.num_prompt_ids :]

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full_text) <= len(prefix_text):
            return ""
        pending = full_text[len(prefix_text) :]
        if pending.endswith("\ufffd") and not final:
            ready = pending[:-1]  # all but a character that may still complete
            out = ready[self.sent :]
            self.sent = max(self.sent, len(ready))
            return out
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        out, self.sent = pending[self.sent :], 0
        return out

    def step(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; return the text they complete (maybe "")."""
        self.ids.extend(new_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """At the end of the output: whatever is still held back."""
        return self._delta(final=True)
