import json
import math

import pytest

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    validate_request,
)

INVALID = [
    ("temperature", -0.1),
    ("temperature", 2.01),
    ("temperature", math.nan),
    ("temperature", "1.0"),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.0001),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("presence_penalty", -2.01),
    ("presence_penalty", 2.01),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", math.inf),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", True),
    ("min_tokens", -1),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("stop", ["x"] * (MAX_STOP_STRINGS + 1)),
    ("stop", ["ok", ""]),
    ("stop", ["y" * (MAX_STOP_STRING_CHARS + 1)]),
    ("stop", [3]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["2"]),
    ("stop_token_ids", [2] * (MAX_STOP_TOKEN_IDS + 1)),
    ("n", 0),
    ("n", MAX_N + 1),
    ("n", True),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.5),
    ("ignore_eos", 1),
    ("skip_special_tokens", "yes"),
    ("include_stop_str_in_output", None),
    ("logit_bias", {5: 100.5}),
    ("logit_bias", {5: -101}),
    ("logit_bias", {5: math.nan}),
    ("logit_bias", {5: "1"}),
    ("logit_bias", {5: True}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"5": 1.0}),
    ("logit_bias", {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}),
    ("logit_bias", [5, 1.0]),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_value_names_its_param(name, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{name: value}).validate()
    assert err.value.param == name
    assert name in str(err.value)


def test_min_tokens_above_max_tokens_names_min_tokens():
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(max_tokens=4, min_tokens=5).validate()
    assert err.value.param == "min_tokens"


VALID = [
    {},
    {"temperature": 0.0},
    {"temperature": 2.0},
    {"temperature": 1},
    {"top_p": 1.0},
    {"top_p": 1e-6},
    {"top_k": -1},
    {"top_k": 0},
    {"top_k": 1},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0},
    {"repetition_penalty": 0.5},
    {"max_tokens": 1, "min_tokens": 1},
    {"logprobs": 0},
    {"logprobs": MAX_LOGPROBS},
    {"stop": ["x"] * MAX_STOP_STRINGS},
    {"stop": ["y" * MAX_STOP_STRING_CHARS]},
    {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))},
    {"n": MAX_N},
    {"seed": 0},
    {"seed": 2**63 - 1},
]


@pytest.mark.parametrize("kwargs", VALID)
def test_boundary_values_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    assert p.validate() is p


def test_defaults():
    p = SamplingParams().validate()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (None, 1.0, 1.0, -1, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.min_tokens) == ([], [], False, 0)
    assert (p.logprobs, p.skip_special_tokens, p.include_stop_str_in_output, p.n) == (
        None, True, False, 1)
    assert p.seed is None


def test_greedy_is_temperature_zero():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-3).greedy
    assert not SamplingParams().greedy


def test_top_k_zero_and_minus_one_are_off():
    assert not SamplingParams(top_k=0).validate().top_k_enabled
    assert not SamplingParams(top_k=-1).validate().top_k_enabled
    assert SamplingParams(top_k=3).validate().top_k_enabled


def test_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_dict_round_trip_is_plain_and_exact():
    p = SamplingParams(
        max_tokens=7, temperature=0.3, top_p=0.8, top_k=5, min_p=0.1, seed=123,
        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
        stop=["\n\n", "END"], stop_token_ids=[2, 9], ignore_eos=True, min_tokens=2,
        logprobs=3, skip_special_tokens=False, include_stop_str_in_output=True, n=2,
        logit_bias={7: -100, 3: 2.5},
    )
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain types only
    q = SamplingParams.from_dict(json.loads(json.dumps(d)))
    assert q == p
    assert q.stop is not p.stop


def test_dict_leaves_out_defaults_so_mixed_versions_refuse_only_what_they_lack():
    assert SamplingParams().to_dict() == {}
    d = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2).to_dict()
    assert d == {"temperature": 0.0, "max_tokens": 4, "prompt_logprobs": 2}
    assert SamplingParams.from_dict(d) == SamplingParams(temperature=0.0, max_tokens=4,
                                                        prompt_logprobs=2)
    # a receiver that predates a parameter sees it only when a request uses it
    older = {k: v for k, v in d.items() if k != "prompt_logprobs"}
    assert SamplingParams.from_dict(SamplingParams(temperature=0.0, max_tokens=4).to_dict()) \
        == SamplingParams.from_dict(older)


def test_from_dict_refuses_unknown_keys_and_validates():
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict({"temperature": 0.5, "best_of": 2})
    assert err.value.param == "best_of"
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict({"top_p": 0.0})
    assert err.value.param == "top_p"


def test_logit_bias_pairs_are_checked_on_the_way_in_and_against_the_vocabulary():
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict({"logit_bias": [[1, 2, 3]]})
    assert err.value.param == "logit_bias"
    assert SamplingParams.from_dict({"logit_bias": [[4, -100]]}).logit_bias == {4: -100}
    assert SamplingParams(logit_bias=None).logit_bias == {}
    ok = SamplingParams(logit_bias={31: 1.0, 0: -100.0, 5: 100})
    validate_request([1, 2], ok, max_model_len=64, vocab_size=32)
    with pytest.raises(InvalidRequestError, match="logit_bias token id 32 is outside") as err:
        validate_request([1, 2], SamplingParams(logit_bias={32: 1.0}), 64, vocab_size=32)
    assert err.value.param == "logit_bias"


def test_stop_token_ids_outside_the_vocabulary_are_refused():
    validate_request([1, 2], SamplingParams(stop_token_ids=[0, 31]), 64, vocab_size=32)
    with pytest.raises(InvalidRequestError, match="stop_token_ids id 32 is outside") as err:
        validate_request([1, 2], SamplingParams(stop_token_ids=[3, 32]), 64, vocab_size=32)
    assert err.value.param == "stop_token_ids"


def test_min_tokens_past_the_context_without_max_tokens_is_refused():
    validate_request([1, 2], SamplingParams(max_tokens=None, min_tokens=62), 64)
    with pytest.raises(InvalidRequestError, match="at most 62 tokens") as err:
        validate_request([1, 2], SamplingParams(max_tokens=None, min_tokens=63), 64)
    assert err.value.param == "min_tokens"
