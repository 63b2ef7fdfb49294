"""The OpenAI API through the real SDK, httpx and curl against a live server: shapes, streaming,
n, logprobs, stop, seeds, usage, tokenize, metrics, disconnects, concurrency."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import subprocess
import time

import httpx
import pytest
from openai import OpenAI

from .conftest import ServerProcess, parse_sse, stream_json, wait_until

pytestmark = pytest.mark.slow  # real or tiny model weights, kernel builds or servers

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def chat_greedy(client: OpenAI, messages=MESSAGES, **kwargs):
    kwargs.setdefault("max_tokens", 16)
    return client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, temperature=0, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# Models, health, docs
# ---------------------------------------------------------------------------------------------


def test_models_health_version_docs(
    server: ServerProcess, client: OpenAI, http: httpx.Client
) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct", "smol", "gpt-test"]
    assert all(m.object == "model" and m.owned_by == "kestrel" for m in models.data)
    assert client.models.retrieve("smol").id == "smol"
    assert http.get("/health").json() == {"status": "ok"}
    assert http.head("/health").status_code == 200
    assert re.match(r"^\d+\.\d+", http.get("/version").json()["version"])
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert (
        body["content"]["application/json"]["schema"]["$ref"]
        == "#/components/schemas/ChatCompletionRequest"
    )
    assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "ChatMessage" in spec["components"]["schemas"]


def test_alias_is_answered_under_its_name(client: OpenAI) -> None:
    out = client.chat.completions.create(
        model="smol", messages=MESSAGES, max_tokens=2, temperature=0
    )
    assert out.model == "smol"


# ---------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------


def test_chat_non_streaming_shape_and_usage(client: OpenAI, tokenizer) -> None:
    out = chat_greedy(client, max_tokens=8, extra_body={"ignore_eos": True})
    assert out.object == "chat.completion"
    assert out.id.startswith("chatcmpl-")
    assert out.model == "smollm2-135m-instruct"
    assert abs(out.created - time.time()) < 60
    [choice] = out.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_chat_multi_turn_system_and_content_parts(
    client: OpenAI, http: httpx.Client, tokenizer
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
        },
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    out = chat_greedy(client, messages=messages, max_tokens=4)
    flat = [dict(m, content="Hi\nthere") if isinstance(m["content"], list) else m for m in messages]
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(flat))
    # tool messages and assistant tool calls reach the template
    tool_turn = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]  # fmt: skip
    tools = [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    ]
    # SmolLM2's template cannot render tools: tool_choice "none" is served, "auto" is a 400
    r = http.post(
        "/v1/chat/completions",
        json={"messages": tool_turn, "tools": tools, "tool_choice": "none", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text


def test_chat_streaming_equals_non_streaming_via_sdk(client: OpenAI) -> None:
    full = chat_greedy(client, max_tokens=24)
    stream = chat_greedy(client, max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [full.choices[0].finish_reason]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.model_dump(exclude={"prompt_tokens_details"}) == full.usage.model_dump(exclude={"prompt_tokens_details"})
    # The same prompt again: every whole block but one holding its last token is a cache hit.
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16 > 0
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_chat_sse_framing_exact(server: ServerProcess, http: httpx.Client) -> None:
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    sse = parse_sse(r.content)
    chunks = stream_json(sse)
    head = {k: chunks[0][k] for k in ("id", "object", "created", "model")}
    assert head["object"] == "chat.completion.chunk"
    for c in chunks:
        assert {k: c[k] for k in head} == head
        assert "usage" in c  # null on all but the last when include_usage is set
    first, *middle, final, usage = chunks
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert first["usage"] is None
    assert middle and all(
        c["choices"][0]["delta"].keys() == {"content"} and c["choices"][0]["finish_reason"] is None
        for c in middle
    )
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    # without include_usage: no usage chunk, no usage key
    r = http.post("/v1/chat/completions", json={**body, "stream_options": None})
    chunks = stream_json(parse_sse(r.content))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


def test_chat_n2_streaming_and_not(client: OpenAI) -> None:
    out = client.chat.completions.create(messages=MESSAGES, model="smol", n=2, max_tokens=12, temperature=0.9,
                                         seed=7, extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 24
    stream = client.chat.completions.create(messages=MESSAGES, model="smol", n=2, max_tokens=12, temperature=0.9,
                                            seed=7, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    texts = {0: "", 1: ""}
    finishes = {}
    roles = set()
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert roles == {0, 1} and set(finishes) == {0, 1}
    # same seed, same sampled text, streaming or not
    assert [texts[0], texts[1]] == [c.message.content for c in out.choices]


def test_seed_reproducibility(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        out = client.chat.completions.create(
            messages=MESSAGES, model="smol", max_tokens=16, temperature=1.0, seed=seed
        )
        return out.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2), sample(3)}) > 1


def test_chat_logprobs(client: OpenAI, tokenizer) -> None:
    out = chat_greedy(
        client, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    text = b""
    for item in content:
        assert len(item.top_logprobs) == 3
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].token == item.token
        assert math.isclose(item.top_logprobs[0].logprob, item.logprob, abs_tol=1e-4)
        text += bytes(item.bytes)
    assert text.decode() == out.choices[0].message.content
    # streaming carries the same logprobs, chunk by chunk
    stream = chat_greedy(
        client,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed = [
        lp
        for c in stream
        if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.content
    ]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in content
    ]
    # logprobs without top_logprobs
    out = chat_greedy(client, max_tokens=3, logprobs=True)
    assert all(item.top_logprobs == [] for item in out.choices[0].logprobs.content)


def test_chat_stop_string_streaming_and_not(client: OpenAI) -> None:
    base = chat_greedy(client, max_tokens=24).choices[0].message.content
    assert len(base) > 12, base
    stop = base[6:10]
    cut = base[: base.index(stop)]
    out = chat_greedy(client, max_tokens=24, stop=[stop, "zzzz-never"])
    assert out.choices[0].message.content == cut
    assert out.choices[0].finish_reason == "stop"
    stream = chat_greedy(client, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == cut


def test_request_id_header_and_response_id(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 1},
        headers={"X-Request-Id": "abc-123"},
    )
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["id"] == "chatcmpl-abc-123"
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert r.json()["id"] == "cmpl-" + r.headers["x-request-id"]
    # the same id twice at once is fine (engine ids are unique per call)
    r = http.get("/health", headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"


def test_defaults_come_from_request_then_model(http: httpx.Client) -> None:
    # chat without max_tokens runs to the end of the answer (not OpenAI completions' 16)
    r = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Say OK."}], "temperature": 0},
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    # completions default to 16 tokens
    r = http.post(
        "/v1/completions", json={"prompt": "Once upon a time", "temperature": 0, "ignore_eos": True}
    )
    assert r.json()["usage"]["completion_tokens"] == 16


# ---------------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------------


def test_completions_prompt_forms(client: OpenAI, tokenizer) -> None:
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    greedy = {"max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    one = client.completions.create(model="smol", prompt=prompt, **greedy)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert one.usage.prompt_tokens == len(ids)
    text = one.choices[0].text
    assert client.completions.create(model="smol", prompt=ids, **greedy).choices[0].text == text
    many = client.completions.create(model="smol", prompt=[prompt, "1, 2, 3,"], max_tokens=6, temperature=0, n=2,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == text
    assert many.usage.prompt_tokens == len(ids) + len(tokenizer.encode("1, 2, 3,"))
    assert many.usage.completion_tokens == 4 * 6
    lists = client.completions.create(
        model="smol", prompt=[ids, tokenizer.encode("1, 2, 3,")], **greedy
    )
    assert [c.text for c in lists.choices] == [many.choices[0].text, many.choices[2].text]


def test_completions_streaming_multi_prompt(client: OpenAI) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    full = client.completions.create(model="smol", prompt=prompts, max_tokens=8, temperature=0, n=2)
    stream = client.completions.create(model="smol", prompt=prompts, max_tokens=8, temperature=0, n=2,
                                       stream=True, stream_options={"include_usage": True})  # fmt: skip
    texts: dict[int, str] = {}
    finishes = {}
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    assert finishes == {c.index: c.finish_reason for c in full.choices}
    assert usage.model_dump(exclude={"prompt_tokens_details"}) == full.usage.model_dump(exclude={"prompt_tokens_details"})


def test_completions_echo_and_logprobs(client: OpenAI, http: httpx.Client) -> None:
    prompt = "Hello, my name is"
    plain = client.completions.create(model="smol", prompt=prompt, max_tokens=5, temperature=0)
    echoed = client.completions.create(
        model="smol", prompt=prompt, max_tokens=5, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    stream = client.completions.create(
        model="smol", prompt=prompt, max_tokens=5, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == echoed.choices[0].text

    out = client.completions.create(model="smol", prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    lp = out.choices[0].logprobs
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    )
    assert "".join(lp.tokens) == out.choices[0].text
    offset = 0
    for token, value, top, start in zip(
        lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    ):
        assert start == offset
        offset += len(token)
        assert len(top) == 2 and max(top.values()) == pytest.approx(value, abs=1e-4)
    # streamed completions logprobs: offsets continue across chunks
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 0,
                                           "stream": True, "ignore_eos": True})  # fmt: skip
    chunks = stream_json(parse_sse(r.content))
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_completions_stop_and_stop_token_ids(client: OpenAI, tokenizer) -> None:
    prompt = "1, 2, 3, 4,"
    base = (
        client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    assert "," in base[2:], base
    stop = ","
    out = client.completions.create(
        model="smol", prompt=prompt, max_tokens=12, temperature=0, stop=stop
    )
    assert (
        out.choices[0].text == base[: base.index(stop)] and out.choices[0].finish_reason == "stop"
    )
    [comma] = tokenizer.encode(",")
    out = client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"stop_token_ids": [comma]})  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == base[: base.index(",")]
    assert out.choices[0].model_extra["stop_reason"] == comma


# ---------------------------------------------------------------------------------------------
# Tokenize, metrics, CORS, curl
# ---------------------------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(http: httpx.Client, client: OpenAI, tokenizer) -> None:
    text = "Kestrels hover — ça va? 🦅 <|im_end|>"
    r = http.post(
        "/tokenize", json={"model": "smol", "prompt": text, "return_token_strs": True}
    ).json()
    assert r["tokens"] == tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 8192 and len(r["token_strs"]) == r["count"]
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    r = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert r["tokens"] == tokenizer.encode_chat(MESSAGES)
    assert r["token_strs"] is None
    assert chat_greedy(client, max_tokens=1).usage.prompt_tokens == r["count"]


def test_metrics(http: httpx.Client, client: OpenAI) -> None:
    chat_greedy(client, max_tokens=3)
    # Alone and greedy, an answer that copies its prompt is decoded with accepted drafts.
    copy = [{"role": "user", "content": "Copy this sentence exactly: The quick brown fox jumps over the lazy dog."}]
    chat_greedy(client, messages=copy, max_tokens=24)
    text = http.get("/metrics").text
    assert re.search(
        r'kestrel_http_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', text
    )
    for name in ("kestrel_time_to_first_token_seconds_count", "kestrel_inter_token_latency_seconds_count",
                 "kestrel_e2e_request_latency_seconds_count", "kestrel_prompt_tokens_total",
                 "kestrel_generation_tokens_total", "kestrel_spec_decode_draft_tokens_total",
                 "kestrel_spec_decode_accepted_tokens_total", "kestrel_prefix_cache_queries_total",
                 "kestrel_prefix_cache_hits_total", "kestrel_model_weight_bytes"):  # fmt: skip
        assert float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1)) > 0, name
    for name in ("kestrel_num_requests_running", "kestrel_num_requests_waiting", "kestrel_kv_cache_blocks_used",
                 "kestrel_kv_cache_blocks_total", "kestrel_num_preemptions_total"):  # fmt: skip
        assert re.search(rf"^{name} \S+$", text, re.MULTILINE), name


def test_cors_preflight(http: httpx.Client) -> None:
    r = http.options("/v1/chat/completions", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})  # fmt: skip
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://example.test"
    r = http.get("/v1/models", headers={"Origin": "http://example.test"})
    assert r.headers["access-control-allow-origin"] == "http://example.test"


def test_curl_chat_and_stream(server: ServerProcess) -> None:
    body = json.dumps(
        {"model": "smollm2-135m-instruct", "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    )
    out = subprocess.run(["curl", "-sS", "--fail-with-body", f"{server.base_url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, check=True, timeout=60)  # fmt: skip
    full = json.loads(out.stdout)["choices"][0]["message"]["content"]
    body = json.dumps({"messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sS", "-N", "--fail-with-body", f"{server.base_url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, check=True, timeout=60)  # fmt: skip
    chunks = stream_json(parse_sse(out.stdout))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full


def test_streams_carry_ping_comments(http: httpx.Client) -> None:
    # The shared server pings every 0.05 s; 40 tokens take longer than that.
    r = http.post(
        "/v1/completions",
        json={"prompt": "Count:", "max_tokens": 40, "stream": True, "ignore_eos": True},
    )
    sse = parse_sse(r.content)
    assert sse.comments and set(sse.comments) == {"ping"}
    assert len(stream_json(sse)) >= 2


# ---------------------------------------------------------------------------------------------
# Disconnects and concurrency
# ---------------------------------------------------------------------------------------------


def _metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    return float(re.search(rf"^kestrel_{name} (\S+)$", text, re.MULTILINE).group(1))


def _engine_gauges(http: httpx.Client) -> tuple[float, float]:
    return _metric(http, "num_requests_running"), _metric(http, "kv_cache_blocks_used")


def _wait_gauges(http: httpx.Client, want_running: bool) -> None:
    """Wait for the engine gauges to show work (running and holding blocks) or none at all."""

    def reached() -> bool:
        running, used = _engine_gauges(http)
        return running > 0 and used > 0 if want_running else running == 0 and used == 0

    wait_until(reached, f"engine gauges showing running={want_running}")


def _raw_post(server: ServerProcess, path: str, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_disconnect_aborts_and_frees_kv_blocks(
    server: ServerProcess, http: httpx.Client, stream: bool
) -> None:
    _wait_gauges(http, want_running=False)
    generated_before = _metric(http, "engine_generation_tokens_total")
    body = {
        "prompt": "Tell me a long story.",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": stream,
    }
    sock = _raw_post(server, "/v1/completions", body)
    try:
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        _wait_gauges(http, want_running=True)
    finally:
        sock.close()
    _wait_gauges(http, want_running=False)
    # Freed by the abort, not by running to its end.
    assert _metric(http, "engine_generation_tokens_total") - generated_before < 2000
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_sdk_stream_close_aborts(client: OpenAI, http: httpx.Client) -> None:
    _wait_gauges(http, want_running=False)
    generated_before = _metric(http, "engine_generation_tokens_total")
    stream = client.completions.create(model="smol", prompt="Once", max_tokens=2000, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    next(iter(stream))
    stream.close()
    _wait_gauges(http, want_running=False)
    assert _metric(http, "engine_generation_tokens_total") - generated_before < 2000


def test_32_concurrent_streams_match_solo_greedy(server: ServerProcess, client: OpenAI) -> None:
    prompts = [f"Write a sentence about the number {i}." for i in range(8)]
    solo = [chat_greedy(client, messages=[{"role": "user", "content": p}], max_tokens=16).choices[0].message.content
            for p in prompts]  # fmt: skip

    async def one(sdk, prompt: str) -> str:
        stream = await sdk.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_at_once() -> list[str]:
        async with server.async_sdk(timeout=300) as sdk:
            return await asyncio.gather(*(one(sdk, prompts[i % 8]) for i in range(32)))

    results = asyncio.run(all_at_once())
    assert results == [solo[i % 8] for i in range(32)]
