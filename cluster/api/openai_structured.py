"""The OpenAI API's structured-output fields as the engine's constraint
(splitserve.engine.structured): OpenAI's ``response_format`` (``text``,
``json_object``, ``json_schema``) and vLLM's ``structured_outputs``
(exactly one of ``json``, ``regex``, ``grammar``, ``choice``). Errors name
the field the client used."""

from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any

import jsonschema

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.structured import PARAM, check_spec, choice_spec, json_object_spec

if TYPE_CHECKING:  # tool_calls imports this module
    from splitserve.cluster.api.tool_calls import ToolRequest

_VLLM = "structured_outputs"
# llguidance holds a JSON schema's integers in 64 bits (i64 or u64): a larger
# one fails inside it as a server fault, so it is refused here.
_INT_MIN, _INT_MAX = -2**63, 2**64 - 1
_LONG_DIGITS = re.compile(r"\d{19}")  # the shortest integer that may be out of that range
# OpenAI's rule for the names a client gives a JSON schema or a function
OPENAI_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_constraint(spec: dict[str, str], param: str) -> None:
    """The engine's ``check_spec`` (a 400 naming ``param`` unless the
    constraint compiles), after refusing a JSON schema integer outside 64 bits."""
    if spec.get("type") == "json" and _LONG_DIGITS.search(spec.get("value") or ""):
        try:
            json.loads(spec["value"], parse_int=lambda text: _bounded_int(text, param))
        except InvalidRequestError:
            raise
        except (ValueError, RecursionError):  # not JSON: check_spec says so
            pass
    check_spec(spec, param)


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """A 400 naming ``param`` unless ``schema`` is a JSON schema by its
    metaschema (its ``$schema``'s draft, else 2020-12): for a schema the
    model only reads (a tool's parameters under tool_choice auto or none),
    which need not be one llguidance compiles."""
    error = _schema_error(json.dumps(schema, sort_keys=True))
    if error:
        raise InvalidRequestError(f"{param} is not a JSON schema: {error}", param=param)


@functools.lru_cache(maxsize=1024)
def _schema_error(text: str) -> str:
    # milliseconds per schema: cached, as clients send the same tools with every turn
    schema = json.loads(text)
    cls = jsonschema.Draft202012Validator
    if isinstance(schema.get("$schema"), str):  # otherwise 2020-12's metaschema says what is wrong
        cls = jsonschema.validators.validator_for(schema, default=cls)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        return f"at {where or 'the top'}: {e.message[:200]}"
    return ""


def constraint_refusal(e: BaseException, field: str | None) -> BaseException:
    """``e`` naming ``field``, the request field a constraint came from, when
    it is an engine's refusal of that constraint: an engine checks it again
    with its model's own tokens (``GrammarCompiler.matcher``: a grammar naming
    a token the model lacks passes ``check_spec``'s check) and names
    ``response_format`` whatever field the client used."""
    if field is None or field == PARAM or not isinstance(e, InvalidRequestError) or e.param != PARAM:
        return e
    return InvalidRequestError(str(e), param=field)


def constraint_field(tools: ToolRequest | None, otherwise: str, tool_level: bool = True) -> str:
    """The request field a structured output constraint came from: the
    tools' (``ToolRequest.constraint_param``, written the chat API's way,
    ``tools[i].function.parameters``; ``tool_level`` False for APIs whose
    tools have no ``function`` level: gRPC's, the Responses API's), else
    ``otherwise``."""
    if tools is None or tools.constraint_param is None:
        return otherwise
    return tools.constraint_param if tool_level else tools.constraint_param.replace(".function", "")


def _bounded_int(text: str, param: str) -> int:
    value = int(text) if len(text) <= 40 else None
    if value is None or not _INT_MIN <= value <= _INT_MAX:
        raise InvalidRequestError(
            f"the JSON schema has the integer {text[:40]}{'...' if len(text) > 40 else ''}; "
            "its integers must fit in 64 bits (-2**63 to 2**64 - 1)", param=param)
    return value


def structured_output(response_format: dict[str, Any] | None,
                      vllm: dict[str, Any] | None) -> dict[str, str] | None:
    """The engine's constraint (splitserve.engine.structured) from OpenAI's
    ``response_format`` or vLLM's ``structured_outputs``; None for plain text."""
    if response_format is not None and vllm is not None:
        raise InvalidRequestError("set response_format or structured_outputs, not both",
                                  param="structured_outputs")
    if vllm is not None:
        spec = _vllm_structured(vllm)
        check_constraint(spec, _VLLM)  # here, to name the field the client used
        return spec
    if response_format is None:
        return None
    kind = response_format.get("type")
    extra = set(response_format) - {"type", "json_schema"}
    if extra or (kind != "json_schema" and "json_schema" in response_format):
        raise InvalidRequestError(
            f"response_format has unexpected fields: {sorted(set(response_format) - {'type'})}"[:200],
            param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_spec()
    if kind != "json_schema":
        raise InvalidRequestError(
            "response_format.type must be text, json_object or json_schema, got "
            f"{str(kind)[:40]!r}", param="response_format.type")
    js = response_format.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
        raise InvalidRequestError(
            "response_format.json_schema must be an object with a JSON schema object in \"schema\"",
            param="response_format.json_schema")
    unknown = set(js) - {"name", "schema", "strict", "description"}
    if unknown:
        raise InvalidRequestError(f"response_format.json_schema: unknown fields {sorted(unknown)}"[:200],
                                  param="response_format.json_schema")
    check_schema_fields(js, "response_format.json_schema")
    spec = {"type": "json", "value": json.dumps(js["schema"])}
    check_constraint(spec, "response_format")
    return spec


def check_schema_fields(fmt: dict[str, Any], where: str) -> None:
    """The fields beside a JSON schema (chat's ``response_format.json_schema``,
    the Responses API's ``text.format``) each of its type when given, and
    the name as OpenAI allows it (``OPENAI_NAME``): a 400 naming it otherwise."""
    for key, kind, what in (("name", str, "a string"), ("description", str, "a string"),
                            ("strict", bool, "a boolean")):
        if fmt.get(key) is not None and not isinstance(fmt[key], kind):
            raise InvalidRequestError(f"{where}.{key} must be {what}", param=f"{where}.{key}")
    if fmt.get("name") is not None and not OPENAI_NAME.fullmatch(fmt["name"]):
        raise InvalidRequestError(f"{where}.name must be 1-64 letters, digits, '_' or '-'",
                                  param=f"{where}.name")


def _vllm_structured(so: dict[str, Any]) -> dict[str, str]:
    given = [k for k in ("json", "regex", "grammar", "choice") if so.get(k) is not None]
    unknown = set(so) - {"json", "regex", "grammar", "choice"}
    if unknown or len(given) != 1:
        raise InvalidRequestError(
            "structured_outputs takes exactly one of json, regex, grammar, choice", param=_VLLM)
    kind, value = given[0], so[given[0]]
    if kind == "choice":
        return choice_spec(value, _VLLM)
    if kind == "json":
        return {"type": "json", "value": value if isinstance(value, str) else json.dumps(value)}
    if not isinstance(value, str):
        raise InvalidRequestError(f"structured_outputs.{kind} must be a string", param=_VLLM)
    return {"type": kind, "value": value}
