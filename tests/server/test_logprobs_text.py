"""Through the live server: logprobs list exactly the returned text's tokens. Never the eos that
ended the answer (SmolLM2's and Qwen's `<|im_end|>`), never tokens a stop string removed; chat
and completions, streamed and not. The listed tokens, joined, equal the content (a token that a
stop string cuts in two is not listed: then they fall short of it by that token's returned part).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import ServerProcess, parse_sse, stream_json

pytestmark = pytest.mark.slow  # real model weights and servers

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
# Greedy, both models answer this with a few tokens and then <|im_end|>.
SHORT = [{"role": "user", "content": "Reply with one word: yes or no?"}]
# Greedy SmolLM2: "1. Red: This is the most obvious colour, ..." (tokens "1", ".", " Red", ...).
LONG = [{"role": "user", "content": "Name three colours."}]


# -- one answer, as returned (text, listed tokens as bytes and strings, finish, usage) ----------


def _chat_entries(logprobs: dict[str, Any] | None) -> list[dict[str, Any]]:
    return logprobs["content"] if logprobs else []


def chat_answer(http: httpx.Client, stream: bool, **body: Any) -> dict[str, Any]:
    """content, tokens (bytes of each listed entry), finish_reason, usage; streamed answers also
    check at every chunk that the listed tokens never run ahead of the text sent so far."""
    body = {"temperature": 0, "logprobs": True, **body}
    if not stream:
        r = http.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        choice = out["choices"][0]
        entries = _chat_entries(choice["logprobs"])
        return {"content": choice["message"]["content"], "entries": entries,
                "finish": choice["finish_reason"], "usage": out["usage"]}  # fmt: skip
    r = http.post(CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    chunks = stream_json(parse_sse(r.content))
    content, entries, finish = "", [], None
    for chunk in chunks[:-1]:
        choice = chunk["choices"][0]
        content += choice["delta"].get("content") or ""
        entries += _chat_entries(choice["logprobs"])
        finish = choice["finish_reason"] or finish
        assert content.encode().startswith(joined_bytes(entries)), (content, entries)
    return {"content": content, "entries": entries, "finish": finish, "usage": chunks[-1]["usage"]}


def completion_answer(http: httpx.Client, stream: bool, **body: Any) -> dict[str, Any]:
    body = {"temperature": 0, "logprobs": 1, **body}
    if not stream:
        r = http.post(COMPLETIONS, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return {"text": choice["text"], "logprobs": choice["logprobs"], "finish": choice["finish_reason"]}
    r = http.post(COMPLETIONS, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    text, finish = "", None
    logprobs: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in stream_json(parse_sse(r.content)):
        choice = chunk["choices"][0]
        text += choice["text"]
        for key in logprobs:
            logprobs[key] += choice["logprobs"][key]
        finish = choice["finish_reason"] or finish
        assert text.startswith("".join(logprobs["tokens"])), (text, logprobs["tokens"])
    return {"text": text, "logprobs": logprobs, "finish": finish}


def chat_prompt_ids(http: httpx.Client, messages: list[dict[str, str]]) -> list[int]:
    """The chat's prompt as token ids: completions on it answer as the chat does."""
    return http.post("/tokenize", json={"messages": messages}).json()["tokens"]


def joined_bytes(entries: list[dict[str, Any]]) -> bytes:
    return b"".join(bytes(entry["bytes"]) for entry in entries)


def assert_completion_logprobs_describe(text: str, logprobs: dict[str, Any]) -> str:
    """The per-token lists agree with each other and with the text; returns the joined tokens."""
    tokens = logprobs["tokens"]
    assert len(tokens) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
    offset = 0
    for token, start in zip(tokens, logprobs["text_offset"], strict=True):
        assert start == offset and text[start:].startswith(token), (text, tokens)
        offset += len(token)
    return "".join(tokens)


# -- the eos that ends an answer -------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_chat_logprobs_leave_out_the_eos(http: httpx.Client, stream: bool) -> None:
    answer = chat_answer(http, stream, messages=SHORT, max_tokens=32, top_logprobs=2)
    assert answer["finish"] == "stop" and answer["content"], answer
    assert joined_bytes(answer["entries"]) == answer["content"].encode()
    assert "".join(e["token"] for e in answer["entries"]) == answer["content"]
    assert all("<|" not in e["token"] for e in answer["entries"]), answer["entries"]
    # the eos was generated (and is counted) but is not part of the content
    assert len(answer["entries"]) == answer["usage"]["completion_tokens"] - 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_completions_logprobs_leave_out_the_eos(http: httpx.Client, stream: bool) -> None:
    answer = completion_answer(http, stream, prompt=chat_prompt_ids(http, SHORT), max_tokens=32)
    assert answer["finish"] == "stop" and answer["text"], answer
    assert assert_completion_logprobs_describe(answer["text"], answer["logprobs"]) == answer["text"]


def test_qwen_chat_logprobs_leave_out_im_end(qwen: ServerProcess) -> None:
    with httpx.Client(base_url=qwen.base_url, timeout=300) as http:
        for stream in (False, True):
            answer = chat_answer(http, stream, messages=SHORT, max_tokens=16)
            assert answer["finish"] == "stop" and answer["content"], answer
            assert joined_bytes(answer["entries"]) == answer["content"].encode()
            assert "<|im_end|>" not in [e["token"] for e in answer["entries"]]
            assert len(answer["entries"]) == answer["usage"]["completion_tokens"] - 1


# -- stop strings ----------------------------------------------------------------------------


def test_stop_strings_logprobs_cover_only_returned_text(http: httpx.Client) -> None:
    full = chat_answer(http, False, messages=LONG, max_tokens=12)
    tokens = [bytes(e["bytes"]).decode() for e in full["entries"]]
    assert full["content"].startswith("1. Red: This is the most"), full["content"]
    assert tokens[:3] == ["1", ".", " Red"], tokens
    cases = [
        # (stop, returned content, listed tokens)
        ([" Red"], "1.", ["1", "."]),  # starts on a token boundary: exactly the content
        (["ed: T"], "1. R", ["1", "."]),  # cuts " Red" in two: it is not listed
        (["never appears", "1."], "", []),  # the answer's first tokens are the stop string
    ]
    prompt = chat_prompt_ids(http, LONG)
    for stop, content, listed in cases:
        for stream in (False, True):
            answer = chat_answer(http, stream, messages=LONG, max_tokens=12, stop=stop)
            assert (answer["finish"], answer["content"]) == ("stop", content), (stop, answer)
            assert [bytes(e["bytes"]).decode() for e in answer["entries"]] == listed, (stop, answer)

            out = completion_answer(http, stream, prompt=prompt, max_tokens=12, stop=stop)
            assert (out["finish"], out["text"]) == ("stop", content), (stop, out)
            assert assert_completion_logprobs_describe(out["text"], out["logprobs"]) == "".join(listed)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_held_back_text_keeps_its_logprobs_until_released(http: httpx.Client, stream: bool) -> None:
    # A stop string whose prefixes keep occurring makes the stream hold text back; the tokens of
    # held-back text are listed with it (chat_answer checks each chunk), then all of them.
    answer = chat_answer(http, stream, messages=LONG, max_tokens=12, stop=["is the least", ". Red!"])
    assert answer["finish"] == "length" and answer["content"]
    assert joined_bytes(answer["entries"]) == answer["content"].encode()
    assert len(answer["entries"]) == answer["usage"]["completion_tokens"] == 12

