"""What one request may ask for: every size limit of the client APIs and of
request validation, in one place (documented in docs/api.md, "Limits").

Each limit bounds work that one request makes the ingress or a replica do
on threads other requests share: a request past one is refused with HTTP
400 / gRPC INVALID_ARGUMENT naming the field, before that work starts.
They are set above what real clients send (OpenAI itself takes at most 4
stop sequences and 300 logit_bias entries; vLLM sets no limit on most of
these) and far below what would stall a batch.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.errors import InvalidRequestError

# -- choices: each one is a full sequence in a decode batch -------------------
MAX_N = 16  # choices per prompt (OpenAI allows 128)
MAX_PROMPTS = 64  # prompts in one completions request
MAX_CHOICES = 64  # prompts x n: each choice is its own request in the cluster

# -- prompt text: refused by its length before it is tokenized ----------------
# A prompt's text (or a chat's message text) may have at most this many
# characters per token of the model's context. Text averages 3-5 characters
# a token, so any prompt that fits the context passes; text past the bound
# would not fit, and tokenizing it would cost the ingress seconds.
PROMPT_CHARS_PER_TOKEN = 16

# -- sampling -------------------------------------------------------------------
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_STOP_STRINGS = 16  # OpenAI: 4
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (OpenAI: 300)

# -- structured outputs and tools ---------------------------------------------
MAX_SPEC_CHARS = 64 << 10  # a JSON schema / regex / grammar's text
# Containers nested in a request body, a JSON schema, tool parameters or a
# tool call's arguments. Python's JSON encoder and the chat template recurse
# once per level (past ~1000 levels: RecursionError); llguidance refuses
# schemas past 128. Hand-written and generated schemas stay under ~20.
MAX_JSON_DEPTH = 64
MAX_CHOICE_STRINGS = 256  # structured_outputs.choice
MAX_TOOLS = 128

# -- identifiers ----------------------------------------------------------------
# a client's request id, echoed on every streamed response (gRPC's request_id)
MAX_REQUEST_ID_CHARS = 256


def max_prompt_chars(max_model_len: int) -> int:
    return PROMPT_CHARS_PER_TOKEN * max_model_len


def check_prompt_chars(chars: int, max_model_len: int, param: str) -> None:
    """Refuse a prompt of ``chars`` characters that cannot fit a context of
    ``max_model_len`` tokens, without tokenizing it."""
    limit = max_prompt_chars(max_model_len)
    if chars > limit:
        raise InvalidRequestError(
            f"the prompt has {chars} characters; this model's context of {max_model_len} tokens "
            f"takes at most {limit} ({PROMPT_CHARS_PER_TOKEN} per token)", param=param)


def nesting_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if ``value`` (parsed JSON: dicts, lists, scalars) nests more than
    ``limit`` containers deep; a scalar is depth 0. Iterative: safe on any
    depth."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        for child in (v.values() if isinstance(v, dict) else v):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False
