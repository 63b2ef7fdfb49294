"""Through the live server: JSON types are enforced as OpenAI enforces them (no string or boolean
where a number is expected, no float where an integer is), on every JSON route, and a body not
declared application/json is refused."""

from __future__ import annotations

import json
import subprocess

import httpx
import openai
import pytest

from .conftest import ServerProcess, assert_error

pytestmark = pytest.mark.slow  # real model weights and servers

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
BASE = {
    CHAT: {"messages": USER, "max_tokens": 2},
    COMPLETIONS: {"prompt": "Hi", "max_tokens": 2},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1, 2]},
}
INVALID = "invalid_request_error"

# (route, field values, param, the words of the message)
WRONG_TYPES = [
    (CHAT, {"max_tokens": "5"}, "max_tokens", "expected an integer, but got a string"),
    (CHAT, {"max_tokens": 5.0}, "max_tokens", "expected an integer, but got a decimal number"),
    (CHAT, {"max_completion_tokens": True}, "max_completion_tokens", "expected an integer, but got a boolean"),
    (CHAT, {"n": True}, "n", "expected an integer, but got a boolean"),
    (CHAT, {"temperature": "0.5"}, "temperature", "expected a number, but got a string"),
    (CHAT, {"top_p": False}, "top_p", "expected a number, but got a boolean"),
    (CHAT, {"seed": "7"}, "seed", "expected an integer, but got a string"),
    (CHAT, {"stream": 1}, "stream", "expected a boolean, but got an integer"),
    (CHAT, {"stream": "true"}, "stream", "expected a boolean, but got a string"),
    (CHAT, {"logprobs": 1}, "logprobs", "expected a boolean, but got an integer"),
    (CHAT, {"top_logprobs": "2", "logprobs": True}, "top_logprobs", "expected an integer"),
    (CHAT, {"logit_bias": {"5": "1"}}, "logit_bias.5", "expected a number, but got a string"),
    (CHAT, {"stop": 5}, "stop", "expected one of a string or an array, but got an integer"),
    (CHAT, {"messages": [{"role": "user", "content": 42}]}, "messages[0].content",
     "expected one of a string or an array, but got an integer"),
    (CHAT, {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     "expected a boolean"),
    (CHAT, {"repetition_penalty": "1.1"}, "repetition_penalty", "expected a number"),
    (CHAT, {"ignore_eos": 0}, "ignore_eos", "expected a boolean"),
    (COMPLETIONS, {"max_tokens": "5"}, "max_tokens", "expected an integer, but got a string"),
    (COMPLETIONS, {"logprobs": True}, "logprobs", "expected an integer, but got a boolean"),
    (COMPLETIONS, {"echo": "false"}, "echo", "expected a boolean, but got a string"),
    (COMPLETIONS, {"presence_penalty": "0"}, "presence_penalty", "expected a number"),
    (COMPLETIONS, {"top_k": 2.0}, "top_k", "expected an integer, but got a decimal number"),
    ("/tokenize", {"prompt": 5}, "prompt", "expected a string, but got an integer"),
    ("/tokenize", {"add_special_tokens": "no"}, "add_special_tokens", "expected a boolean"),
    ("/detokenize", {"tokens": ["1"]}, "tokens[0]", "expected an integer, but got a string"),
    ("/detokenize", {"tokens": [1, True]}, "tokens[1]", "expected an integer, but got a boolean"),
    ("/detokenize", {"tokens": [1.0]}, "tokens[0]", "expected an integer, but got a decimal number"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "fields", "param", "words"),
    WRONG_TYPES,
    ids=[f"{path.rsplit('/', 1)[-1]}-{json.dumps(fields)[:40]}" for path, fields, _, _ in WRONG_TYPES],
)
def test_wrong_json_type_is_a_400_naming_the_param(
    http: httpx.Client, path: str, fields: dict, param: str, words: str
) -> None:
    r = http.post(path, json={**BASE[path], **fields})
    error = assert_error(r, 400, type=INVALID, param=param, code="invalid_type")
    assert words in error["message"] and repr(param) in error["message"], error


def test_integers_are_valid_numbers(http: httpx.Client) -> None:
    body = {**BASE[CHAT], "temperature": 0, "top_p": 1, "presence_penalty": 0, "frequency_penalty": -1,
            "repetition_penalty": 1, "min_p": 0, "logit_bias": {"5": -1}}  # fmt: skip
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_sdk_sees_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smol", messages=USER, max_tokens="5")  # type: ignore[arg-type]
    assert (info.value.param, info.value.code) == ("max_tokens", "invalid_type")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="smol", prompt="Hi", temperature="0.5")  # type: ignore[arg-type]
    assert (info.value.param, info.value.code) == ("temperature", "invalid_type")


# -- Content-Type ----------------------------------------------------------------------------

REFUSED_CONTENT_TYPES = [
    None,  # no Content-Type at all
    "text/plain",
    "application/x-www-form-urlencoded",  # what `curl -d` sends without -H
    "multipart/form-data; boundary=x",
    "application/jsonp",
    "application/json; charset=latin-1",
]


@pytest.mark.parametrize("path", list(BASE))
@pytest.mark.parametrize("content_type", REFUSED_CONTENT_TYPES, ids=str)
def test_body_not_declared_json_is_refused(
    http: httpx.Client, path: str, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = http.post(path, content=json.dumps(BASE[path]).encode(), headers=headers)
    error = assert_error(r, 415, type=INVALID, param=None, code="unsupported_media_type")
    assert "application/json" in error["message"]


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"]
)
def test_json_content_types_are_accepted(http: httpx.Client, content_type: str) -> None:
    for path, body in BASE.items():
        r = http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": content_type})
        assert r.status_code == 200, (path, r.text)


def test_form_post_from_curl_is_refused(server: ServerProcess) -> None:
    body = json.dumps(BASE[CHAT])
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", f"{server.base_url}{CHAT}", "-d", body],
                         capture_output=True, check=True, timeout=60, text=True)  # fmt: skip
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "415" and json.loads(payload)["error"]["code"] == "unsupported_media_type"
