"""server.protocol without a server: strict JSON, error params, and request -> SamplingParams."""

from __future__ import annotations

import pytest

from server.errors import APIError
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    format_param,
    messages_for_template,
    parse_json,
    to_sampling_params,
    validate,
)

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def test_defaults_precedence_request_then_defaults_then_openai() -> None:
    model_defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    params = to_sampling_params(chat(temperature=0.2), model_defaults)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (
        0.2,
        0.8,
        20,
        1.05,
    )
    assert params.presence_penalty == 0.0 and params.n == 1 and params.max_tokens is None
    params = to_sampling_params(chat(), {})
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 0)
    # server default max_tokens applies only when the request has none
    assert to_sampling_params(chat(), {}, default_max_tokens=7).max_tokens == 7
    assert to_sampling_params(chat(max_tokens=3), {}, default_max_tokens=7).max_tokens == 3
    completion = CompletionRequest.model_validate({"prompt": "x"})
    assert to_sampling_params(completion, {}, default_max_tokens=16).max_tokens == 16


def test_chat_fields_map_to_sampling_params() -> None:
    params = to_sampling_params(
        chat(max_tokens=5, max_completion_tokens=9, logprobs=True, top_logprobs=3, stop="END",
             logit_bias={"42": -100}, seed=1, n=2, stop_token_ids=[7], ignore_eos=True, min_tokens=2),
        {},
    )  # fmt: skip
    assert params.max_tokens == 9 and params.logprobs == 3 and params.stop == ["END"]
    assert params.logit_bias == {42: -100.0} and params.seed == 1 and params.n == 2
    assert params.stop_token_ids == [7] and params.ignore_eos and params.min_tokens == 2
    assert to_sampling_params(chat(logprobs=True), {}).logprobs == 0
    assert to_sampling_params(chat(logprobs=False), {}).logprobs is None


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"temperature": -1}, "temperature"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
    ],
)
def test_sampling_errors_name_the_request_field(request_fields, param) -> None:
    with pytest.raises(APIError) as info:
        to_sampling_params(chat(**request_fields), {})
    assert info.value.status == 400 and info.value.param == param


def test_parse_json_rejects_what_python_accepts() -> None:
    assert parse_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for raw, param in (
        (b'{"a": NaN}', "a"),
        (b'{"a": [1, Infinity]}', "a[1]"),
        (b'{"a": {"b": -1e400}}', "a.b"),
        (b'{"a": "\\udc00"}', "a"),
        (b"\xff", None),
        (b"", None),
        (b"{", None),
    ):
        with pytest.raises(APIError) as info:
            parse_json(raw)
        assert info.value.status == 400 and info.value.param == param, raw


def test_validation_error_param_is_the_deepest_field() -> None:
    with pytest.raises(APIError) as info:
        validate(
            ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}
        )
    assert info.value.param == "messages[0].content[0].type"
    assert "only text content parts" in info.value.message
    assert (
        format_param(["messages", 0, "content", "list[TextContentPart]", 1, "text"])
        == "messages[0].content[1].text"
    )
    assert format_param(["prompt", "str"]) == "prompt"


def test_messages_for_template() -> None:
    request = chat(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "reasoning_content": "hmm",
             "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
            {"role": "tool", "tool_call_id": "1", "content": "ok"},
        ]
    )  # fmt: skip
    first, second, third = messages_for_template(request.messages)
    assert first == {"role": "user", "content": "a\nb"}
    assert second["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert second["reasoning_content"] == "hmm" and "content" not in second
    assert third == {"role": "tool", "tool_call_id": "1", "content": "ok"}


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"max_tokens": "5"}, "max_tokens", "expected an integer, but got a string instead"),
        ({"max_tokens": 5.0}, "max_tokens", "expected an integer, but got a decimal number instead"),
        ({"n": True}, "n", "expected an integer, but got a boolean instead"),
        ({"temperature": "0.5"}, "temperature", "expected a number, but got a string instead"),
        ({"stream": 1}, "stream", "expected a boolean, but got an integer instead"),
        ({"stop": 1}, "stop", "expected one of a string or an array, but got an integer instead"),
        ({"stop": [1]}, "stop[0]", "expected a string, but got an integer instead"),
        ({"messages": [{"role": "user", "content": None, "tool_calls": [{"function": "f"}]}]},
         "messages[0].tool_calls[0].function", "expected an object, but got a string instead"),
    ],
)  # fmt: skip
def test_types_are_strict_as_openai_checks_them(fields, param, message) -> None:
    with pytest.raises(APIError) as info:
        validate(ChatCompletionRequest, {"messages": USER, **fields})
    assert (info.value.status, info.value.param, info.value.code) == (400, param, "invalid_type")
    assert info.value.message == f"Invalid type for {param!r}: {message}."


def test_integers_are_accepted_as_numbers() -> None:
    request = validate(ChatCompletionRequest, {"messages": USER, "temperature": 0, "top_p": 1})
    assert (request.temperature, request.top_p) == (0.0, 1.0)
