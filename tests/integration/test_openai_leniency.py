"""The request-field policy of the HTTP API, endpoint by endpoint, against a
real server: a field accepted and ignored changes nothing in the answer, a
refused one is a 400 naming it and saying why, one accepted only at its
default is a 400 at any other value, an unknown one is a 400 naming it; and
docs/api.md's table says exactly what the request models do."""

import re
from pathlib import Path

import httpx
import pytest

from splitserve.cluster.api.openai_api import build_http_app
from splitserve.cluster.api.openai_schema import ChatCompletionRequest, CompletionRequest
from splitserve.cluster.api.responses_schema import ResponsesRequest
from tests.integration.api_fixtures import engines, local, paths  # noqa: F401
from tests.integration.test_openai_api import AUTH, INVALID, ServerThread, assert_error

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
# endpoint -> (path, its request model, a small greedy request, the answer's text)
ENDPOINTS = {
    "completions": ("/v1/completions", CompletionRequest,
                    {"model": MODEL, "prompt": "hello there", "max_tokens": 4, "temperature": 0},
                    lambda r: r["choices"][0]["text"]),
    "chat": ("/v1/chat/completions", ChatCompletionRequest,
             {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
              "temperature": 0},
             lambda r: r["choices"][0]["message"]["content"]),
    "responses": ("/v1/responses", ResponsesRequest,
                  {"model": MODEL, "input": "hello", "max_output_tokens": 4, "temperature": 0},
                  lambda r: "".join(p["text"] for item in r["output"] if item["type"] == "message"
                                    for p in item["content"])),
}
# a value of each ignored field, as clients send it
IGNORED_VALUES = {
    "user": "user-1", "store": True, "metadata": {"k": "v"}, "service_tier": "auto",
    "prompt_cache_key": "conversation-7", "safety_identifier": "hash-1",
    "request_id": "req-1", "length_penalty": 1.5, "reasoning_effort": "low", "verbosity": "low",
    "reasoning": {"effort": "low", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
    "max_tool_calls": 2, "prompt_cache_retention": "24h",
}
# a value other than the one accepted, of each field accepted at one value only
OTHER_VALUES = {"use_beam_search": True, "return_tokens_as_token_ids": True,
                "spaces_between_special_tokens": False, "modalities": ["text", "audio"],
                "continue_final_message": True, "echo": True, "background": True,
                "truncation": "auto", "top_logprobs": 3}


@pytest.fixture(scope="module")
def url(local):
    server = ServerThread(build_http_app(local, [AUTH["Authorization"][7:]], 1 << 20))
    yield server.url
    server.stop()


def post(url, endpoint, **fields):
    path, _, body, _ = ENDPOINTS[endpoint]
    return httpx.post(url + path, json={**body, **fields}, headers=AUTH, timeout=60)


def cases(kind):
    for endpoint, (_, model, _, _) in ENDPOINTS.items():
        names = {"ignored": model.IGNORED, "only": model.ONLY, "refused": model.REFUSED}[kind]
        for name in names:
            yield pytest.param(endpoint, name, id=f"{endpoint}-{name}")


@pytest.mark.parametrize("endpoint,field", cases("ignored"))
def test_an_ignored_field_changes_nothing(url, endpoint, field):
    text = ENDPOINTS[endpoint][3]
    plain, given = post(url, endpoint), post(url, endpoint, **{field: IGNORED_VALUES[field]})
    assert plain.status_code == given.status_code == 200, given.text
    assert text(given.json()) == text(plain.json())
    counts = lambda u: {k: v for k, v in u.items() if "details" not in k}  # noqa: E731 - cache hits vary
    assert counts(given.json()["usage"]) == counts(plain.json()["usage"])


@pytest.mark.parametrize("endpoint,field", cases("ignored"))
def test_an_ignored_field_is_still_type_checked(url, endpoint, field):
    wrong = "five" if isinstance(IGNORED_VALUES[field], (int, float)) else 5
    assert_error(post(url, endpoint, **{field: wrong}), 400, INVALID, field)


@pytest.mark.parametrize("endpoint,field", cases("only"))
def test_a_field_is_accepted_only_at_its_default(url, endpoint, field):
    allowed, why = ENDPOINTS[endpoint][1].ONLY[field]
    assert post(url, endpoint, **{field: allowed}).status_code == 200
    r = post(url, endpoint, **{field: OTHER_VALUES[field]})
    assert_error(r, 400, INVALID, field)
    assert why in r.json()["error"]["message"]


@pytest.mark.parametrize("endpoint,field", cases("refused"))
def test_a_refused_field_is_a_400_saying_why(url, endpoint, field):
    why = ENDPOINTS[endpoint][1].REFUSED[field]
    r = post(url, endpoint, **{field: {"any": "value"}})
    assert_error(r, 400, INVALID, field, "unsupported_parameter")
    assert r.json()["error"]["message"] == f"{field} is not supported: {why}"[:1024]
    assert post(url, endpoint, **{field: None}).status_code == 200  # null is absent


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_an_unknown_field_is_a_400_naming_it(url, endpoint):
    assert_error(post(url, endpoint, temprature=0.5), 400, INVALID, "temprature", "unknown_parameter")


def test_add_special_tokens(url):
    plain = post(url, "completions").json()["usage"]["prompt_tokens"]
    bare = post(url, "completions", add_special_tokens=False).json()["usage"]["prompt_tokens"]
    assert bare == plain - 1  # no BOS
    chat = post(url, "chat").json()["usage"]["prompt_tokens"]
    assert post(url, "chat", add_special_tokens=True).json()["usage"]["prompt_tokens"] == chat + 1


def doc_table() -> dict[str, dict[str, str]]:
    """docs/api.md's "Request fields" table: field -> {endpoint: cell}."""
    section = (ROOT / "docs" / "api.md").read_text().split("### Request fields", 1)[1]
    lines = section.split("\n### ", 1)[0].splitlines()
    header = next(line for line in lines if line.startswith("| field"))
    by_path = {path: name for name, (path, *_) in ENDPOINTS.items()}
    columns = [by_path.get(c.strip().strip("`")) for c in header.strip("|").split("|")[1:]]
    table = {}
    for row in (line for line in lines if line.startswith("| `")):
        fields, *cells = [c.strip() for c in row.strip("|").split("|")]
        for name in re.findall(r"`([a-z_]+)`", fields):
            table[name] = {col: cell for col, cell in zip(columns, cells) if col is not None}
    return table


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_docs_table_is_what_the_request_models_do(endpoint):
    model = ENDPOINTS[endpoint][1]
    cells = {name: row[endpoint] for name, row in doc_table().items()}
    assert {n for n, c in cells.items() if c == "ignored"} == set(model.IGNORED)
    assert {n for n, c in cells.items() if c == "400"} == set(model.REFUSED)
    assert {n for n, c in cells.items() if c.startswith("only")} == set(model.ONLY)
    absent = {n for n, c in cells.items() if c == "—"}
    assert absent & (set(model.model_fields) | set(model.REFUSED)) == set()
    assert set(model.model_fields) <= set(cells) - absent  # every field is in the table
