"""/metrics counts requests and sequences apart: a request with n=4 is one request, four sequences."""

from __future__ import annotations

import re

import httpx
from openai import OpenAI

from .conftest import wait_until

# Far more than the test waits for: the streams are closed once the gauges were seen.
LONG = {
    "model": "smollm2-135m-instruct",
    "max_tokens": 4000,
    "temperature": 1.0,
    "extra_body": {"ignore_eos": True},
}


def _gauges(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics").text
    names = ("requests_running", "requests_waiting", "sequences_running", "sequences_waiting")
    return {
        name: float(re.search(rf"^kestrel_num_{name} (\S+)$", text, re.MULTILINE).group(1))
        for name in names
    }


def _wait_gauges(http: httpx.Client, **want: float) -> None:
    seen: list[dict[str, float]] = []

    def reached() -> bool:
        seen.append(_gauges(http))
        return all(seen[-1][name] == value for name, value in want.items())

    try:
        wait_until(reached, f"gauges {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen[-1]}") from None


def test_a_request_with_n_4_is_one_request_of_four_sequences(
    client: OpenAI, http: httpx.Client
) -> None:
    _wait_gauges(http, requests_running=0, sequences_running=0)  # nothing left from other tests
    stream = client.chat.completions.create(
        messages=[{"role": "user", "content": "Tell me a long story."}], n=4, stream=True, **LONG
    )
    with stream:
        next(iter(stream))  # admitted and prefilled: the four sequences decode
        _wait_gauges(http, requests_running=1, requests_waiting=0,
                     sequences_running=4, sequences_waiting=0)  # fmt: skip
    _wait_gauges(http, requests_running=0, sequences_running=0)


def test_a_completions_call_counts_one_request_per_prompt(
    client: OpenAI, http: httpx.Client
) -> None:
    _wait_gauges(http, requests_running=0, sequences_running=0)
    stream = client.completions.create(
        prompt=["Once upon a time", "The weather today"], n=2, stream=True, **LONG
    )
    with stream:
        next(iter(stream))
        _wait_gauges(http, requests_running=2, requests_waiting=0,
                     sequences_running=4, sequences_waiting=0)  # fmt: skip
    _wait_gauges(http, requests_running=0, sequences_running=0)
