"""Through the live server: numerically hostile sampling values never reach the sampler as NaN or
inf. A temperature below the floor (engine.sampling_params.MIN_TEMPERATURE) is greedy; values
that would overflow the logits are refused with a 400; NaN / Infinity literals are refused."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import assert_error, parse_sse, stream_json

pytestmark = pytest.mark.slow  # real model weights and servers

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The three primary colours are"
INVALID = "invalid_request_error"


def answer(http: httpx.Client, path: str, stream: bool = False, **fields: Any) -> tuple[str, str]:
    """(text, finish_reason) of one well-formed answer of 8 tokens at most."""
    body = {"messages": MESSAGES} if path == CHAT else {"prompt": PROMPT}
    body |= {"max_tokens": 8, **fields}
    r = http.post(path, json={**body, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        chunks = stream_json(parse_sse(r.content))
        choices = [c["choices"][0] for c in chunks]
        text = "".join((c["delta"].get("content") or "") if path == CHAT else c["text"] for c in choices)
        return text, next(c["finish_reason"] for c in choices if c["finish_reason"])
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if path == CHAT else choice["text"]
    assert r.json()["usage"]["completion_tokens"] >= 1
    return text, choice["finish_reason"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_temperature_below_the_floor_is_greedy(http: httpx.Client, path: str, temperature: float) -> None:
    greedy = answer(http, path, temperature=0)
    assert greedy[0].strip(), greedy
    assert answer(http, path, temperature=temperature) == greedy
    assert answer(http, path, stream=True, temperature=temperature, seed=3) == greedy


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1e-5, "top_p": 1e-300},  # the floor itself; top_p keeps the top token
        {"temperature": 1e-300, "repetition_penalty": 0.01},
        {"temperature": 1e-5, "repetition_penalty": 100},
        {"temperature": 0.5, "min_p": 1e-300, "presence_penalty": 1e-300, "frequency_penalty": -1e-300},
        {"temperature": 2.0, "top_k": 1, "repetition_penalty": 0.01, "logit_bias": {"5": -100, "6": 100}},
        {"temperature": 0.7, "min_p": 1.0},
    ],
    ids=repr,
)
def test_extreme_accepted_values_give_a_real_answer(http: httpx.Client, fields: dict) -> None:
    for path in (CHAT, COMPLETIONS):
        # NaN logits made every draw token 0, a special token: an empty answer of max_tokens.
        text, finish = answer(http, path, seed=1, **fields)
        assert text.strip() and finish in ("stop", "length"), (path, text, finish)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 0, -1, 0.001, 1e300, 101])
def test_repetition_penalty_that_could_overflow_logits_is_refused(
    http: httpx.Client, path: str, penalty: float
) -> None:
    body = {"messages": MESSAGES} if path == CHAT else {"prompt": PROMPT}
    r = http.post(path, json={**body, "max_tokens": 4, "repetition_penalty": penalty})
    error = assert_error(r, 400, type=INVALID, param="repetition_penalty", code="invalid_value")
    assert "[0.01, 100.0]" in error["message"]


# Python's json module reads these literals; JSON has no NaN or Infinity, and the server refuses them.
NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"]


@pytest.mark.parametrize("literal", NON_FINITE, ids=lambda b: b.decode())
@pytest.mark.parametrize(
    "field", ["temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p"]
)
def test_non_finite_literals_are_refused(http: httpx.Client, literal: bytes, field: str) -> None:
    for path, base in ((CHAT, b'{"messages": [{"role": "user", "content": "Hi"}]'), (COMPLETIONS, b'{"prompt": "Hi"')):
        raw = base + b', "max_tokens": 2, "' + field.encode() + b'": ' + literal + b"}"
        r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert_error(r, 400, type=INVALID, param=field, code="invalid_value")
    raw = b'{"prompt": "Hi", "max_tokens": 2, "logit_bias": {"5": ' + literal + b"}}"
    r = http.post(COMPLETIONS, content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, type=INVALID, param="logit_bias.5", code="invalid_value")
