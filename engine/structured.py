"""Structured outputs: sampling constrained to a JSON schema, any JSON
object, a regular expression or a Lark grammar, through llguidance.

A request carries its constraint as ``SamplingParams.structured_output``,
``{"type": kind, "value": text}`` with kind one of ``KINDS``:

  json     ``value`` is a JSON schema (``{"type": "object"}`` is OpenAI's
           ``json_object`` mode); output is JSON with ", " and ": " separators
           and no other whitespace (a schema's "x-guidance" options may change
           that)
  regex    the whole output matches ``value``
  grammar  ``value`` is a Lark grammar (llguidance's dialect)

Each constrained sequence owns a ``GrammarMatcher``: before each sampling
step it yields the allowed-token mask, and every token the sequence takes
(sampled here, sampled by a prefill replica, or produced before a resume)
advances it. When the grammar admits no further token the sequence ends
with finish reason ``stop``; EOS is allowed exactly where the grammar may
end. A constraint no output satisfies at all is refused before it runs
(``check_spec``, and ``GrammarCompiler.matcher`` with the model's tokens),
and so is one whose regexes unroll past a size the matcher serves without
stalling the batch (``splitserve.engine.regex_size``);
one that reaches a dead end later (a state with no allowed token and no
end: llguidance does not prove a grammar free of them) ends the sequence
with finish reason ``error``: the text so far does not match. The matcher lives with the sequence's request state, so preemption
(recompute) keeps it; a replica that receives a sequence builds a new one
and replays the tokens produced so far.

llguidance is imported on first use: engines that never see a constrained
request do not need it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
from torch import Tensor

from splitserve.engine import json_text
from splitserve.engine.deep_stack import run_deep
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.limits import MAX_CHOICE_STRINGS, MAX_SPEC_CHARS
from splitserve.engine.regex_size import oversized_regex

KINDS = ("json", "regex", "grammar")
PARAM = "response_format"  # what errors name (the OpenAI field)
# whitespace: none between JSON tokens beyond the separators below
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a core dependency; absent only in odd installs
        raise InvalidRequestError(
            "structured outputs need the llguidance package on the serving replicas",
            param=PARAM) from None
    return llguidance


def _limits():
    # llguidance's own bounds on grammar size and per-step work, kept explicit:
    # a client's grammar must not stall a replica's batch
    return _llguidance().LLParserLimits(max_grammar_size=200_000, step_max_items=50_000,
                                        step_lexer_fuel=200_000, initial_lexer_fuel=1_000_000)


def check_spec(spec: Any, param: str = PARAM) -> None:
    """Raise InvalidRequestError unless ``spec`` is a well-formed
    ``{"type", "value"}`` constraint whose grammar compiles; the error names
    ``param`` (the field the client wrote it in)."""
    if not isinstance(spec, dict) or set(spec) != {"type", "value"}:
        raise InvalidRequestError(
            "structured_output must be {\"type\": kind, \"value\": text}", param=param)
    kind, value = spec["type"], spec["value"]
    if kind not in KINDS:
        raise InvalidRequestError(f"structured output type must be one of {', '.join(KINDS)}, "
                                  f"got {str(kind)[:40]!r}", param=param)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"the {kind} constraint must be a non-empty string", param=param)
    if len(value) > MAX_SPEC_CHARS:
        raise InvalidRequestError(
            f"the {kind} constraint is {len(value)} characters; at most {MAX_SPEC_CHARS}",
            param=param)
    error = _compile_error(kind, value)
    if error:
        raise InvalidRequestError(f"invalid {kind} constraint: {error}"[:600], param=param)


@functools.lru_cache(maxsize=256)
def _compile_error(kind: str, value: str) -> str:
    # each hop (ingress, prefill, decode) validates the same spec: compile once per process;
    # on a deep-stack thread: llguidance recurses once per level of rules
    return run_deep(_compile_error_now, kind, value)


def _compile_error_now(kind: str, value: str) -> str:
    try:
        grammar = grammar_text(kind, value)
    except InvalidRequestError as e:
        return str(e)
    # before compiling: such a regex costs most of a second to compile, then as much per mask
    schema = json_text.parse_field(value, "the JSON schema") if kind == "json" else None
    oversized = oversized_regex(kind, value, schema)
    if oversized:
        return oversized
    llg = _llguidance()
    error = llg.LLMatcher.validate_grammar(grammar, None, limits=_limits())
    if error:
        return error
    if _accepts_nothing(grammar):
        return ("it can never be satisfied: no output at all matches it (not even an empty "
                "one), e.g. a rule defined only by itself or a class no character is in")
    return ""


class _ByteTokens:
    """A tokenizer of 256 one-byte tokens and an EOS (llguidance's
    ``TokenizerWrapper`` reads these attributes): it can spell any text, so a
    constraint that allows none of its tokens and no EOS first allows none
    under any model's tokenizer either."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


@functools.lru_cache(maxsize=1)
def _byte_tokenizer():
    llg = _llguidance()
    return llg.LLTokenizer(llg.TokenizerWrapper(_ByteTokens()))


def _accepts_nothing(grammar: str) -> bool:
    """Whether the grammar's first step allows nothing: llguidance's
    validation (without a tokenizer) passes ``start: start``, ``{"$ref": "#"}``
    or ``[^\\s\\S]``, and a matcher then lands in its error state at the
    first mask, which the sampler would read as "only EOS" (an empty output
    labelled a normal stop)."""
    m = _llguidance().LLMatcher(_byte_tokenizer(), grammar, log_level=0, limits=_limits())
    if m.is_error():
        # the byte tokenizer lacks what the grammar names (a special token such as
        # <|eot_id|>): the serving replica's matcher checks with its own tokenizer
        return False
    m.compute_bitmask()
    return m.is_error()


@functools.lru_cache(maxsize=256)
def grammar_text(kind: str, value: str) -> str:
    """llguidance's grammar for a spec (raises InvalidRequestError on a JSON
    schema that is not a JSON object)."""
    llg = _llguidance()
    if kind == "json":
        try:  # the message names the schema: check_spec's caller knows the field it came in
            schema = json_text.parse_field(value, "the JSON schema")
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), param=PARAM) from None
        if not isinstance(schema, dict):
            raise InvalidRequestError("the JSON schema must be a JSON object", param=PARAM)
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(value)
    return llg.LLMatcher.grammar_from_lark(value)


def json_object_spec() -> dict[str, str]:
    """OpenAI's ``json_object`` mode: any JSON object."""
    return {"type": "json", "value": '{"type": "object"}'}


class GrammarCompiler:
    """One per engine: the tokenizer's llguidance view (a few ms to build
    for a 32k vocabulary, about a second for 128k+; ``warm`` builds it at
    start so that no request waits for it), and matchers for requests."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width
        self._eos = list(eos_token_ids)
        self._ll_tokenizer = None

    def _ll(self):
        if self._ll_tokenizer is None:
            llg = _llguidance()
            backend = self._tokenizer.backend
            n_vocab = max(self.vocab_size, backend.get_vocab_size(with_added_tokens=True))
            self._ll_tokenizer = llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab,
                                                 eos_token=self._eos or None)
        return self._ll_tokenizer

    def warm(self) -> None:
        """Build the tokenizer view now (when llguidance is installed)."""
        try:
            self._ll()
        except InvalidRequestError:  # llguidance missing: constrained requests are refused
            pass

    def _new_matcher(self, kind: str, value: str):
        # compiles the grammar (recursively: run_deep's thread)
        return _llguidance().LLMatcher(self._ll(), grammar_text(kind, value), log_level=0,
                                       limits=_limits())

    def matcher(self, spec: dict[str, str], prior_tokens: list[int] = ()) -> "GrammarMatcher":
        """A matcher for ``spec`` that has consumed ``prior_tokens`` (output
        the request produced before this replica took it over)."""
        m = run_deep(self._new_matcher, spec["type"], spec["value"])
        if m.is_error():
            raise InvalidRequestError(f"invalid {spec['type']} constraint: {m.get_error()}"[:600],
                                      param=PARAM)
        gm = GrammarMatcher(m, self._ll().vocab_size)
        for t in prior_tokens:
            if not gm.consume(t):
                raise InvalidRequestError(
                    "the tokens already generated do not match the structured output constraint",
                    param=PARAM)
        if not prior_tokens and gm.first_step_dead():
            # check_spec's byte-level test passes a grammar naming this tokenizer's
            # special tokens; here the real vocabulary decides
            raise InvalidRequestError(
                f"invalid {spec['type']} constraint: it can never be satisfied with this "
                "model's tokens (no token and no end of output is allowed first)", param=PARAM)
        return gm


class GrammarMatcher:
    def __init__(self, matcher, ll_vocab: int):
        self._m = matcher
        self._words = (ll_vocab + 31) // 32

    def consume(self, token_id: int) -> bool:
        """Advance by one token; False if the grammar refused it (the
        matcher is then in an error state and allows nothing more)."""
        return self._m.consume_token(token_id)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens``, in order, the grammar would accept from
        its current state (speculative drafts are cut there); the state
        does not change."""
        return self._m.validate_tokens(tokens)

    def first_step_dead(self) -> bool:
        """Whether the next step allows no token and no end: llguidance finds
        such a dead end only when it computes a mask (then in its error state)."""
        self._m.compute_bitmask()
        return self._m.is_error()

    @property
    def dead_end(self) -> bool:
        """The last mask found no token and no end allowed (llguidance's error
        state: the mask then allows only EOS). The token sampled from it
        does not satisfy the constraint; the request ends with finish
        reason ``error``."""
        return self._m.is_error()

    @property
    def done(self) -> bool:
        """No further token can extend the output (or the matcher failed)."""
        return self._m.is_stopped() or self._m.is_error()

    def fill_mask(self, row: Tensor) -> None:
        """Write the allowed-token bitmask (bit t of word t // 32) into
        ``row``, a contiguous int32 CPU tensor of ``words`` elements."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), self._words * 4)

    @property
    def words(self) -> int:
        return self._words


_BIT = torch.arange(32, dtype=torch.int32)
_executor = None


def fill_masks(matchers: list[GrammarMatcher], bitmask: Tensor) -> None:
    """Each matcher's allowed-token bitmask into its row of ``bitmask``
    ([len(matchers), words] int32, contiguous, CPU). Several matchers are
    computed in parallel on llguidance's own threads (the GIL released),
    one after another otherwise."""
    global _executor
    if len(matchers) == 1:
        matchers[0].fill_mask(bitmask[0])
        return
    if _executor is None:
        _executor = _llguidance().LLExecutor()
    words = matchers[0].words
    _executor.unsafe_compute_mask_ptr([(m._m, j) for j, m in enumerate(matchers)],
                                      bitmask.data_ptr(), words * 4, len(matchers))



def apply_masks(x: Tensor, rows: list[int], matchers: list[GrammarMatcher]) -> None:
    """Set the logits of tokens each row's grammar does not allow to -inf.
    ``x``: [B, V] float logits (written in place); ``rows``: the constrained
    rows, ``matchers`` theirs."""
    words = matchers[0].words
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    fill_masks(matchers, bitmask)
    vocab, dev = x.shape[1], x.device
    # unpacked where the logits are: 1 bit per token crosses to the device, not 8
    bits = _BIT if dev.type == "cpu" else _BIT.to(dev)
    bitmask = bitmask.to(dev, non_blocking=True)
    allowed = ((bitmask[:, :, None] >> bits) & 1).reshape(len(rows), words * 32).bool()
    if allowed.shape[1] < vocab:  # tokens past the tokenizer's vocabulary: never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    allowed = allowed[:, :vocab]
    idx = torch.tensor(rows, device=dev)
    x[idx] = x[idx].masked_fill(~allowed, -torch.inf)


def choice_spec(choices: Any, param: str = PARAM) -> dict[str, str]:
    """A constraint whose output is exactly one of ``choices`` (strings)."""
    if not isinstance(choices, list) or not choices:
        raise InvalidRequestError("choice must be a non-empty list of strings", param=param)
    if len(choices) > MAX_CHOICE_STRINGS:
        raise InvalidRequestError(
            f"choice takes at most {MAX_CHOICE_STRINGS} strings, got {len(choices)}", param=param)
    if any(not isinstance(c, str) or not c for c in choices):
        raise InvalidRequestError("choice entries must be non-empty strings", param=param)
    # Lark string literals take JSON's escapes
    return {"type": "grammar", "value": "start: " + " | ".join(json.dumps(c) for c in choices)}
