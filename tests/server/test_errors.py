"""Every client mistake is a 4xx OpenAI error envelope (status, type, param, code), never a 5xx,
and the server answers a normal request right after."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server.serving import RequestGroup  # noqa: F401 - the server package imports cleanly

from .conftest import ServerProcess, assert_error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
INVALID = "invalid_request_error"


def chat(**fields) -> bytes:
    return json.dumps({"messages": USER, "max_tokens": 2, **fields}).encode()


def completion(**fields) -> bytes:
    return json.dumps({"prompt": "Hi", "max_tokens": 2, **fields}).encode()


# (name, method, path, raw body, status, type, param, code)
CASES = [
    ("malformed-json", "POST", CHAT, b'{"messages": [', 400, INVALID, None, "invalid_json"),
    ("empty-body", "POST", CHAT, b"", 400, INVALID, None, "invalid_json"),
    ("not-an-object", "POST", CHAT, b"[1, 2]", 400, INVALID, None, "invalid_type"),
    ("nan", "POST", CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
     400, INVALID, "temperature", "invalid_value"),
    ("infinity", "POST", COMPLETIONS, b'{"prompt": "Hi", "top_p": -Infinity}', 400, INVALID, "top_p", "invalid_value"),
    ("overflowing-float", "POST", COMPLETIONS, b'{"prompt": "Hi", "temperature": 1e999}',
     400, INVALID, "temperature", "invalid_value"),
    ("nested-nan", "POST", COMPLETIONS, b'{"prompt": "Hi", "logit_bias": {"5": NaN}}',
     400, INVALID, "logit_bias.5", "invalid_value"),
    ("huge-integer-literal", "POST", COMPLETIONS, b'{"prompt": "Hi", "max_tokens": 1' + b"0" * 5000 + b"}",
     400, INVALID, None, "invalid_json"),
    ("temperature-range", "POST", CHAT, chat(temperature=5), 400, INVALID, "temperature", "invalid_value"),
    ("top-p-zero", "POST", CHAT, chat(top_p=0), 400, INVALID, "top_p", "invalid_value"),
    ("n-zero", "POST", CHAT, chat(n=0), 400, INVALID, "n", "invalid_value"),
    ("n-too-big", "POST", CHAT, chat(n=1000), 400, INVALID, "n", "invalid_value"),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400, INVALID, "max_tokens", "invalid_value"),
    ("max-completion-tokens-negative", "POST", CHAT, chat(max_completion_tokens=-1),
     400, INVALID, "max_completion_tokens", "invalid_value"),
    ("top-logprobs-range", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, INVALID, "top_logprobs", "invalid_value"),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), 400, INVALID, "top_logprobs", None),
    ("completions-logprobs-range", "POST", COMPLETIONS, completion(logprobs=-1), 400, INVALID, "logprobs", "invalid_value"),
    ("seed-out-of-range", "POST", CHAT, chat(seed=2**70), 400, INVALID, "seed", "invalid_value"),
    ("presence-penalty-range", "POST", CHAT, chat(presence_penalty=3), 400, INVALID, "presence_penalty", "invalid_value"),
    ("logit-bias-key", "POST", CHAT, chat(logit_bias={"abc": 1}), 400, INVALID, "logit_bias", None),
    ("logit-bias-token-range", "POST", CHAT, chat(logit_bias={"99999999": 1}), 400, INVALID, "logit_bias", None),
    ("stop-token-ids-range", "POST", CHAT, chat(stop_token_ids=[10**9]), 400, INVALID, "stop_token_ids", None),
    ("empty-stop-string", "POST", CHAT, chat(stop=[""]), 400, INVALID, "stop", "invalid_value"),
    ("wrong-type", "POST", CHAT, chat(temperature="hot"), 400, INVALID, "temperature", "invalid_type"),
    ("lone-surrogate", "POST", CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     400, INVALID, "messages[0].content", "invalid_encoding"),
    ("invalid-utf8", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
     400, INVALID, None, "invalid_encoding"),
    ("missing-messages", "POST", CHAT, b'{"max_tokens": 2}', 400, INVALID, "messages", "missing_required_parameter"),
    ("empty-messages", "POST", CHAT, chat(messages=[]), 400, INVALID, "messages", "invalid_value"),
    ("bad-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "Hi"}]),
     400, INVALID, "messages[0].role", "invalid_value"),
    ("bad-content-type", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]),
     400, INVALID, "messages[0].content", "invalid_type"),
    ("image-content-part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, INVALID, "messages[0].content[1].type", "invalid_value"),
    ("template-rejects-null-content", "POST", CHAT, chat(messages=[{"role": "user"}]),
     400, INVALID, "messages", "invalid_messages"),
    ("missing-prompt", "POST", COMPLETIONS, b'{"max_tokens": 2}', 400, INVALID, "prompt", "missing_required_parameter"),
    ("empty-prompt-list", "POST", COMPLETIONS, completion(prompt=[]), 400, INVALID, "prompt", None),
    ("empty-prompt-string", "POST", COMPLETIONS, completion(prompt=""), 400, INVALID, "prompt", None),
    ("prompt-token-out-of-range", "POST", COMPLETIONS, completion(prompt=[1, 10**7]), 400, INVALID, "prompt", "invalid_value"),
    ("negative-prompt-token", "POST", COMPLETIONS, completion(prompt=[[1, -1]]), 400, INVALID, "prompt", "invalid_value"),
    ("unknown-model", "POST", CHAT, chat(model="gpt-17"), 404, INVALID, "model", "model_not_found"),
    ("unknown-model-completions", "POST", COMPLETIONS, completion(model="nope"), 404, INVALID, "model", "model_not_found"),
    ("unknown-model-retrieve", "GET", "/v1/models/nope", b"", 404, INVALID, "model", "model_not_found"),
    ("context-max-tokens", "POST", CHAT, chat(max_tokens=100_000), 400, INVALID, "messages", "context_length_exceeded"),
    ("context-long-prompt", "POST", COMPLETIONS, completion(prompt="hello " * 9000),
     400, INVALID, "prompt", "context_length_exceeded"),
    ("context-long-messages", "POST", CHAT, chat(messages=[{"role": "user", "content": "hello " * 9000}], max_tokens=None),
     400, INVALID, "messages", "context_length_exceeded"),
    ("response-format-invalid-schema", "POST", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
     400, INVALID, "response_format", "invalid_json_schema"),
    ("response-format-unsupported-keyword", "POST", COMPLETIONS,
     completion(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"dependentRequired": {"a": ["b"]}}}}),
     400, INVALID, "response_format", "invalid_json_schema"),
    ("response-format-without-json-schema", "POST", CHAT, chat(response_format={"type": "json_schema"}),
     400, INVALID, "response_format", "missing_required_parameter"),
    ("response-format-unknown-type", "POST", CHAT, chat(response_format={"type": "xml"}),
     400, INVALID, "response_format.type", "invalid_value"),
    ("structured-outputs-two-kinds", "POST", CHAT, chat(structured_outputs={"regex": "a", "choice": ["b"]}),
     400, INVALID, "structured_outputs", None),
    ("structured-outputs-and-response-format", "POST", CHAT,
     chat(structured_outputs={"regex": "a"}, response_format={"type": "json_object"}), 400, INVALID, "structured_outputs", None),
    ("structured-outputs-bad-regex", "POST", COMPLETIONS, completion(structured_outputs={"regex": "[a-"}),
     400, INVALID, "structured_outputs", "invalid_grammar"),
    ("structured-outputs-structural-tag", "POST", CHAT, chat(structured_outputs={"structural_tag": "{}"}),
     400, INVALID, "structured_outputs", "unsupported_parameter"),
    ("tool-choice-required-without-tools", "POST", CHAT, chat(tool_choice="required"), 400, INVALID, "tool_choice", "invalid_value"),
    ("tool-choice-named-without-tools", "POST", CHAT, chat(tool_choice={"type": "function", "function": {"name": "f"}}),
     400, INVALID, "tool_choice", "invalid_value"),
    # SmolLM2's chat template does not render tools (README: tool calls)
    ("tools-the-template-cannot-render", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]),
     400, INVALID, "tools", "unsupported_parameter"),
    ("suffix", "POST", COMPLETIONS, completion(suffix="end"), 400, INVALID, "suffix", "unsupported_parameter"),
    ("prompt-logprobs-negative", "POST", COMPLETIONS, completion(prompt_logprobs=-1), 400, INVALID, "prompt_logprobs", "invalid_value"),
    ("prompt-logprobs-too-many", "POST", CHAT, chat(prompt_logprobs=21), 400, INVALID, "prompt_logprobs", "invalid_value"),
    ("max-tokens-negative", "POST", COMPLETIONS, completion(max_tokens=-1), 400, INVALID, "max_tokens", "invalid_value"),
    ("best-of", "POST", COMPLETIONS, completion(best_of=3), 400, INVALID, "best_of", "unsupported_parameter"),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}),
     400, INVALID, "stream_options", None),
    ("tokenize-neither", "POST", "/tokenize", b"{}", 400, INVALID, "prompt", None),
    ("detokenize-out-of-range", "POST", "/detokenize", b'{"tokens": [1, 99999999]}', 400, INVALID, "tokens", "invalid_value"),
    ("unknown-route", "GET", "/v1/nothing-here", b"", 404, INVALID, None, "not_found"),
    ("wrong-method", "GET", CHAT, b"", 405, INVALID, None, "method_not_allowed"),
    ("streaming-admission-error", "POST", CHAT, chat(max_tokens=100_000, stream=True),
     400, INVALID, "messages", "context_length_exceeded"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "type", "param", "code"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_error_cases(http: httpx.Client, method, path, body, status, type, param, code) -> None:
    response = http.request(
        method, path, content=body or None, headers={"Content-Type": "application/json"}
    )
    assert_error(response, status, type=type, param=param, code=code)
    # the server still answers a normal request
    ok = http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_errors_never_echo_huge_inputs(http: httpx.Client) -> None:
    huge = "x" * 200_000
    for body in (
        chat(model=huge),
        chat(messages=[{"role": huge, "content": "Hi"}]),
        chat(messages=[{"role": "user", "content": [{"type": huge}]}]),
        chat(logit_bias={huge: 1}),
        chat(stop=huge, temperature=huge),
        b'{"messages": "' + huge.encode() + b"",
    ):
        response = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500
        assert len(response.content) < 2000, response.content[:300]


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=USER)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smol", messages=USER, temperature=9)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="smol", prompt="hello " * 9000, stream=True)
    assert info.value.code == "context_length_exceeded"


def test_in_band_error_framing() -> None:
    """An error after the stream started: one `data: {"error": ...}` event, then [DONE]."""
    import asyncio

    from server.errors import APIError
    from server.serving import _with_error_and_done

    class _Group:
        closed = False

        def close(self) -> None:
            self.closed = True

    async def chunks():
        yield '{"choices": []}'
        raise APIError(
            500, "the engine failed the request: boom", type="server_error", code="engine_error"
        )

    async def collect(group) -> list[str]:
        return [item async for item in _with_error_and_done(chunks(), group, 1, state)]

    group = _Group()
    state: dict = {}
    events = asyncio.run(collect(group))
    assert events[0] == '{"choices": []}' and events[-1] == "[DONE]" and len(events) == 3
    assert json.loads(events[1]) == {"error": {"message": "the engine failed the request: boom",
                                               "type": "server_error", "param": None, "code": "engine_error"}}  # fmt: skip
    assert group.closed
    assert state["in_band_error"].status == 500  # the access log's status


def test_health_is_not_affected_by_errors(server: ServerProcess, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert server.proc.poll() is None


def test_unexpected_exception_is_a_json_500_with_request_id() -> None:
    """Any exception escaping a handler becomes a JSON 500 (the process stays up)."""
    import asyncio

    from engine import EngineStats
    from server.app import RequestContextMiddleware
    from server.metrics import Metrics
    from server.settings import ServerConfig
    from server.shutdown import Drain

    async def broken_app(scope, receive, send) -> None:
        raise RuntimeError("y" * 100_000)

    metrics = Metrics(lambda: EngineStats(0, 0, 0, 1, 0, 0, 0))
    app = RequestContextMiddleware(
        broken_app, ServerConfig(access_log=False), metrics, Drain(lambda error, reason: 0)
    )

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/anything", headers={"X-Request-Id": "req-1"})

    response = asyncio.run(call())
    error = assert_error(response, 500, type="server_error", param=None, code="internal_error")
    assert "yyyy" not in error["message"]
    assert response.headers["x-request-id"] == "req-1"
