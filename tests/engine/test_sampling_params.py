"""engine.sampling_params: validation naming the field, normalisation, defaults precedence."""

from __future__ import annotations

import math

import pytest

from engine.sampling_params import MIN_TEMPERATURE, SamplingParams, SamplingParamsError

INVALID = [
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"n": 2.0}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": -1}, "max_tokens"),  # 0 scores a prompt only (prompt_logprobs)
    ({"max_tokens": True}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"min_p": 1.01}, "min_p"),
    ({"min_p": -0.01}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # would overflow logits to inf
    ({"repetition_penalty": 0.0099}, "repetition_penalty"),
    ({"repetition_penalty": 100.5}, "repetition_penalty"),
    ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"logit_bias": {5: 100.5}}, "logit_bias"),
    ({"logit_bias": {5: -101}}, "logit_bias"),
    ({"logit_bias": {5: math.nan}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"seed": 2**64}, "seed"),
    ({"seed": True}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
]


@pytest.mark.parametrize("values, param", INVALID, ids=[repr(v) for v, _ in INVALID])
def test_invalid_value_raises_error_naming_the_field(values, param):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**values)
    assert info.value.param == param
    assert param in str(info.value)


@pytest.mark.parametrize(
    "logit_bias",
    [{"abc": 1.0}, {1.5: 1.0}, {5: "x"}, {5: True}],
    ids=["str-id", "float-id", "str-bias", "bool-bias"],
)
def test_malformed_logit_bias_entry_raises_error_naming_logit_bias(logit_bias):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(logit_bias=logit_bias)
    assert info.value.param == "logit_bias"


def test_sampling_params_error_is_a_value_error():
    assert issubclass(SamplingParamsError, ValueError)


@pytest.mark.parametrize(
    "values",
    [
        {"n": 16},
        {"n": 1},
        {"max_tokens": 1},
        {"min_tokens": 4, "max_tokens": 4},
        {"min_tokens": 100},
        {"temperature": 0},
        {"temperature": 2.0},
        {"top_p": 1},
        {"top_p": 1e-9},
        {"top_k": 1},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"repetition_penalty": 0.01},
        {"repetition_penalty": 100},
        {"temperature": 1e-300},
        {"presence_penalty": -2, "frequency_penalty": 2.0},
        {"logit_bias": {0: -100, 7: 100.0}},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"logprobs": 0},
        {"logprobs": 20},
    ],
    ids=repr,
)
def test_boundary_values_are_accepted(values):
    SamplingParams(**values)


def test_defaults():
    params = SamplingParams()
    assert (params.n, params.max_tokens, params.min_tokens) == (1, None, 0)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, 0, 0.0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        0.0,
        0.0,
        1.0,
    )
    assert (params.stop, params.stop_token_ids, params.logit_bias) == ([], [], {})
    assert (params.logprobs, params.seed, params.ignore_eos, params.skip_special_tokens) == (
        None,
        None,
        False,
        True,
    )


def test_top_k_minus_one_means_off_and_becomes_zero():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=0).top_k == 0


def test_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_logit_bias_keys_become_ints_and_values_floats():
    params = SamplingParams(logit_bias={"5": 1, 7: -2})
    assert params.logit_bias == {5: 1.0, 7: -2.0}
    assert all(type(k) is int and type(v) is float for k, v in params.logit_bias.items())


def test_stop_token_ids_are_copied_into_a_list():
    ids = (3, 4)
    assert SamplingParams(stop_token_ids=ids).stop_token_ids == [3, 4]


def test_temperature_below_the_floor_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    for tiny in (1e-300, 5e-324, 1e-6, MIN_TEMPERATURE / 2):
        params = SamplingParams(temperature=tiny)
        assert params.is_greedy and params.temperature == 0.0
    assert not SamplingParams(temperature=MIN_TEMPERATURE).is_greedy


GENERATION_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def test_with_defaults_value_beats_default():
    params = SamplingParams.with_defaults(GENERATION_DEFAULTS, temperature=0.2, top_k=5)
    assert (params.temperature, params.top_k) == (0.2, 5)
    assert (params.top_p, params.repetition_penalty) == (0.8, 1.05)


def test_with_defaults_none_values_fall_through_to_default():
    params = SamplingParams.with_defaults(
        GENERATION_DEFAULTS, temperature=None, top_p=None, stop=None
    )
    assert (params.temperature, params.top_p, params.stop) == (0.7, 0.8, [])


def test_with_defaults_falsy_values_are_not_treated_as_missing():
    params = SamplingParams.with_defaults(GENERATION_DEFAULTS, temperature=0, top_k=-1)
    assert params.temperature == 0.0
    assert params.is_greedy
    assert params.top_k == 0


def test_with_defaults_ignores_unknown_and_none_defaults():
    defaults = {"temperature": None, "do_sample": True, "max_new_tokens": 5, "min_p": 0.1}
    params = SamplingParams.with_defaults(defaults, max_tokens=8)
    assert (params.temperature, params.min_p, params.max_tokens) == (1.0, 0.1, 8)


def test_with_defaults_validates_the_merged_result():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.with_defaults({"top_p": 0.0})
    assert info.value.param == "top_p"
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.with_defaults(GENERATION_DEFAULTS, temperature=3.0)
    assert info.value.param == "temperature"
