"""Reading an OpenAI request body: within a size limit, as UTF-8 JSON of
bounded nesting, then validated as its request model with errors that name
the offending field (the models: cluster/api/openai_schema.py)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from splitserve.engine import json_text
from splitserve.cluster.api.openai_schema import ApiError, RequestBody
from splitserve.engine.limits import MAX_JSON_DEPTH, nesting_exceeds

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def param_of(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location as a field path (``messages[0].role``).
    Union members appear in locations as type names (``list[int]``); the path
    stops before them."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _UNION_TAGS:
            path += f".{part}" if path else part
        else:
            break
    return path or None


def _out_of_range_field(text: str) -> str | None:
    """The top-level field holding a number too large for a float (1e999),
    found by parsing again leniently (rare: only for such a body)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    return next((key for key, value in data.items()
                 if json_text.find_node(value, _is_infinite) is not None), None)


def _is_infinite(value: Any) -> bool:
    return isinstance(value, float) and math.isinf(value)


async def read_json(request: Request, max_body_bytes: int) -> dict:
    """The request's JSON object; never holds more than ``max_body_bytes``."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise ApiError(400, f"Content-Type must be application/json, got {ctype[:100]!r}",
                           code="invalid_content_type")
    encoding = request.headers.get("content-encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        # the body is read as sent: a compressed one would only fail later as bad UTF-8
        raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported: send the body "
                       "uncompressed", code="unsupported_content_encoding")
    too_large = ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes",
                         code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "invalid Content-Length header", code="invalid_request")
        if int(length) > max_body_bytes:
            raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise too_large
    except ClientDisconnect:  # nobody will read the answer; not a server fault
        raise ApiError(400, "the client disconnected while sending the body",
                       code="client_disconnected") from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})",
                       code="invalid_encoding") from None
    try:
        data, repeated = json_text.loads(text)
    except (ValueError, RecursionError) as e:
        field = _out_of_range_field(text) if isinstance(e, json_text.OutOfRange) else None
        if field is not None:  # a number past float's range, in a field the client named
            raise ApiError(400, f"{field[:100]} holds a number out of range: {e}", param=field,
                           code="invalid_value") from None
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    for key, value in data.items():
        # the schema, the chat template and JSON encoding recurse once per level
        if nesting_exceeds(value, MAX_JSON_DEPTH):
            raise ApiError(400, f"{key[:100]} nests more than {MAX_JSON_DEPTH} levels deep",
                           param=key, code="invalid_value")
    if repeated:  # after the nesting bound: the search recurses
        field = json_text.repeated_key(data)
        if field is not None:
            where = "" if isinstance(data, json_text.Repeated) else f" (inside {field[:100]})"
            raise ApiError(400, f"the body repeats a key{where}: each key may appear once in an "
                           "object", param=field, code="duplicate_key")
    if _SURROGATE_ESCAPE.search(text):  # rare: then find the field that has a lone one
        for key, value in data.items():
            try:
                json.dumps([key, value], ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{key[:100]} has a string that is not valid Unicode (a lone "
                               "surrogate)", param=key, code="invalid_encoding") from None
    return data


async def read_request(request: Request, model_cls: type[RequestBody], max_body_bytes: int) -> Any:
    """The request's body as ``model_cls`` (``read_json``, ``parse_body``),
    its fields checked as supported."""
    body = parse_body(model_cls, await read_json(request, max_body_bytes))
    body.check_supported()
    return body


def parse_body(model_cls: type[RequestBody], data: dict) -> Any:
    """The request model of ``data``; a field of ``model_cls.REFUSED`` is a
    400 naming it and saying why (null counts as absent), an unknown one a
    400 naming it (a typo must not silently change what runs)."""
    for key in [k for k in data if k in model_cls.REFUSED]:
        if data[key] is None:
            del data[key]
        else:
            raise ApiError(400, f"{key} is not supported: {model_cls.REFUSED[key]}", param=key,
                           code="unsupported_parameter")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        first = errors[0]
        parts = [f"{param_of(err['loc']) or 'body'}: {err['msg']}" for err in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ApiError(400, "; ".join(parts) + more, param=param_of(first["loc"]),
                       code="invalid_type" if first["type"] != "extra_forbidden"
                       else "unknown_parameter") from None
